"""The operator's side: admin API, dashboard, /explain views, and the offline check and migrate tools."""
