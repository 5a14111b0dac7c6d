# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run).

# Run a command in place of this shell, or with DRY_RUN=1 print it, quoted for copying.
exec_or_print() {
  [[ -z "${DRY_RUN:-}" ]] && exec "$@"
  quoted "$@"
}

# The arguments as one line a shell would read back the same; plain words stay unquoted.
quoted() {
  local arg line=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then line+=("$arg"); else line+=("$(printf '%q' "$arg")"); fi
  done
  echo "${line[*]}"
}
