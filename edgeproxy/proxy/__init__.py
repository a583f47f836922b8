"""The data plane, once per worker: decide -> access -> balancer -> upstream, one front per protocol."""
