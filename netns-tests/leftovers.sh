#!/usr/bin/env bash
# What tartan's tests, benches and the demo may leave on the machine: nothing. `snapshot FILE`
# records what of ours exists before a run (a developer may have a real tartand), `check FILE`
# fails, naming each item, if the run added any: network namespaces, links or nftables tables
# in the root namespace, tartan's default paths, lab directories in the temporary directory.
set -euo pipefail
state() {
  ip netns list 2>/dev/null | awk '{print "netns " $1}'
  ip -o link show 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print "link " $2}'
  if command -v nft >/dev/null; then nft list tables 2>/dev/null | sed 's/^/nft /'; fi
  for d in /var/lib/tartan /run/tartan; do [ -e "$d" ] && echo "path $d"; done
  for d in "${TMPDIR:-/tmp}"/tartan-* /dev/shm/tartan-*; do [ -e "$d" ] && echo "path $d"; done
  true
}
case "${1:-}" in
  snapshot) state | sort -u >"$2" ;;
  check)
    added=$(state | sort -u | comm -13 "$2" -)
    rm -f "$2"
    if [ -n "$added" ]; then
      echo "left behind on this machine by the run (must be removed by whatever created it):" >&2
      echo "$added" | sed 's/^/  /' >&2
      exit 1
    fi
    echo "nothing left behind: no namespaces, root-namespace links or tables, tartan paths or lab directories"
    ;;
  *) echo "usage: $0 snapshot FILE | check FILE" >&2; exit 2 ;;
esac
