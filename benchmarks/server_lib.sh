# Shared by the compare_*.sh scripts (sourced): one server at a time on $port, its process group in $server_pid.
# The caller sets port and server_pid="" first, and starts servers with `setsid ... &; server_pid=$!`.

wait_ready() {  # log: until /v1/models answers, or the server died
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null; then return 0; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then echo "server exited; log: $1" >&2; tail -30 "$1" >&2; exit 1; fi
    sleep 1
  done
  echo "server not ready after 600 s; log: $1" >&2; exit 1
}

stop_server() {  # Ctrl-C to the server's process group, then SIGKILL after a minute
  [ -n "$server_pid" ] || return 0
  kill -INT -- "-$server_pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$server_pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$server_pid" 2>/dev/null || true
  server_pid=""
  sleep 3  # let the cores go quiet before the next server
}
trap stop_server EXIT
