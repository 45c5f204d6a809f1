# Sourced by scripts/test and scripts/rehearse: make .venv hold snapshot with the extras asked
# for. Extras installed earlier are kept, so the two scripts never undo each other's install.
#
#   ensure_venv test        ensure_venv rehearse
ensure_venv() {
  local want_extras=$1
  PYTHON=${PYTHON:-python3}
  VENV=${VENV:-.venv}
  if [ ! -x "$VENV/bin/python" ]; then
    echo "$(basename "$0"): creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.snapshot-installed"
  local hash
  hash=$(sha256sum pyproject.toml | cut -c1-16)
  local have_hash="" have_extras=""
  if [ -f "$stamp" ]; then
    read -r have_hash have_extras < "$stamp" || true
  fi
  local extras=$want_extras
  if [ "$have_hash" = "$hash" ]; then
    local missing=0 extra
    for extra in ${want_extras//,/ }; do
      case ",$have_extras," in *",$extra,"*) ;; *) missing=1 ;; esac
    done
    [ "$missing" = 0 ] && { compile_snapshot; return 0; }
    extras=$(printf '%s' "$have_extras,$want_extras" | tr ',' '\n' | awk 'NF && !seen[$0]++' | paste -sd, -)
  fi
  # Before the distribution was named snapshot-cutover it was "snapshot": not two of it.
  "$VENV/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y snapshot >/dev/null 2>&1 || true
  echo "$(basename "$0"): installing snapshot-cutover[$extras] (this checkout) into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
  echo "$hash $extras" > "$stamp"
  compile_snapshot
}

# The checkout's bytecode, up to date. pip compiles an installed package's; an editable
# install's is written on first import, except under PYTHONDONTWRITEBYTECODE, when every
# command would compile the tool's modules again (about 50 ms). Cheap when nothing changed.
compile_snapshot() {
  "$VENV/bin/python" -m compileall -q snapshot >/dev/null
}
