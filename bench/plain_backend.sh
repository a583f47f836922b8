# Sourced by ab_pinned.sh and instructions.sh: the plain route's backend and routes file.
#
#   start_plain_backend WORK BACKEND_PORT   (sets NGINX_PID)
#
# Writes WORK/nginx.conf (one nginx worker answering 20 bytes on 127.0.0.1:BACKEND_PORT, no
# access log) and WORK/routes.toml (route "plain": /plain -> that backend), then starts nginx.
start_plain_backend() {
    local work=$1 backend=$2
    cat > "$work/nginx.conf" <<EOF
daemon off; worker_processes 1; pid $work/nginx.pid; error_log $work/nginx.err;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $work; proxy_temp_path $work;
  fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  server { listen 127.0.0.1:$backend; location / { return 200 "hello from backend!\n"; } } }
EOF
    cat > "$work/routes.toml" <<EOF
[routes.plain]
path = "/plain"
upstreams = ["http://127.0.0.1:$backend"]
EOF
    nginx -c "$work/nginx.conf" &
    NGINX_PID=$!
}
