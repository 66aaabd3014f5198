# Sourced by backup-loop.sh (the server has no secrets file: ADR 26). Secrets reach the container as a file it mounts
# ($CIRIS_ENV_FILE; compose.yaml: services.SECRETS_FILE), never as its configured environment, which
# `docker inspect` shows: export its KEY=value lines to this process and what it starts.
if [ -n "${CIRIS_ENV_FILE:-}" ]; then
  [ -r "$CIRIS_ENV_FILE" ] || { echo "CIRIS_ENV_FILE names $CIRIS_ENV_FILE, which cannot be read" >&2; exit 2; }
  n=0
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    case $line in '' | '#'*) continue ;; esac
    case ${line%%=*} in
      "" | *[!A-Za-z0-9_]* | [0-9]* | "$line") echo "CIRIS_ENV_FILE: line $n of $CIRIS_ENV_FILE is not KEY=value" >&2; exit 2 ;;
    esac
    export "$line"
  done < "$CIRIS_ENV_FILE"
fi
