# shellcheck shell=bash
# Sourced by the launch scripts: quote_all WORD... prints the words as one shell command line,
# quoting only the words that need it, so a printed command ("+ ...", --dry-run) can be pasted
# back into a shell as it is.
quote_all() {
  local out="" w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./=:,@%+~-]+$ ]]; then out+="${out:+ }$w"
    else out+="${out:+ }'${w//\'/\'\\\'\'}'"; fi
  done
  printf '%s' "$out"
}
