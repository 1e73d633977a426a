# Shared by the install scripts (sourced, not run). Needs PYTHON and a `log`
# function. `make_venv DIR` creates a venv with pip; where python3 lacks
# ensurepip (Debian without python3-venv), a bare venv filled by the host pip
# instead. Sets VENV_PIP to the pip command for that venv.
make_venv() {
  local dir="$1"
  if "$PYTHON" -m venv "$dir" >&2; then
    VENV_PIP=("$dir/bin/python" -m pip)
  else
    log "python3 -m venv failed; retrying without pip (using the host pip)"
    rm -rf "$dir"
    "$PYTHON" -m venv --without-pip "$dir" >&2
    VENV_PIP=("$PYTHON" -m pip --python "$dir/bin/python")
  fi
}
