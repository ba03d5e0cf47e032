#!/usr/bin/env bash
# CPython 3.14 and 3.15, which pyenv cannot install here, from Debian's unstable
# distribution (sid), in a chroot kept under ~/.cache/llm-py/sid-chroot.
#
#   bash .ci/sid.sh build              make the chroot (about a minute), or keep the one there
#   bash .ci/sid.sh run COMMAND...     run COMMAND in it, from this checkout, as root
#
# `run` mounts /proc, /dev and /dev/pts (fork, pty and terminal tests need them) and
# this checkout at /src, and unmounts them all when the command ends, however it ends
# (a run that was killed leaves them to the next one to unmount).
# The command gets a small environment of its own (HOME=/root, TMPDIR=/tmp, C.UTF-8);
# LLM_FUZZ_EXAMPLES is passed on, nothing else of the caller's. Needs root: as .ci/run
# does, it uses sudo when not root.
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=$PWD
cache="${XDG_CACHE_HOME:-$HOME/.cache}/llm-py"
chroot_dir="$cache/sid-chroot"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
packages="python3.14,python3.15"

unmount_below() {  # unmount whatever is mounted at or below $1, the deepest first
  local target
  target=$(realpath -m "$1")
  awk -v t="$target" '$2 == t || index($2, t "/") == 1 { print $2 }' /proc/mounts | sort -r \
    | while read -r mounted; do $SUDO umount -l "$mounted" || true; done
}

in_chroot() {  # run a command in the chroot with a small environment
  $SUDO env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    TMPDIR=/tmp LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 TERM=dumb DEBIAN_FRONTEND=noninteractive \
    LLM_FUZZ_EXAMPLES="${LLM_FUZZ_EXAMPLES:-}" /usr/sbin/chroot "$@"
}

build() {
  if [ -f "$chroot_dir/.complete" ]; then
    echo "sid chroot: kept ($chroot_dir)"
    return 0
  fi
  if ! command -v debootstrap >/dev/null; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap >/dev/null 2>&1 \
      || { echo "error: cannot install debootstrap"; return 1; }
  fi
  local new="$chroot_dir.new"
  mkdir -p "$cache"
  unmount_below "$new"  # an earlier build that was stopped may have left /proc mounted there
  $SUDO rm -rf --one-file-system "$new"
  unmount_below "$chroot_dir"
  $SUDO rm -rf --one-file-system "$chroot_dir"
  echo "sid chroot: debootstrap --variant=minbase --include=$packages sid $new"
  if ! $SUDO debootstrap --variant=minbase --include="$packages" sid "$new" \
      > "$cache/debootstrap.log" 2>&1; then
    tail -n 20 "$cache/debootstrap.log"
    unmount_below "$new"
    echo "error: debootstrap failed (log: $cache/debootstrap.log)"
    return 1
  fi
  # hypothesis for the property tests (they skip without it); the mirror's Release file
  # can be older than this machine's clock, hence Check-Valid-Until=false
  in_chroot "$new" sh -c 'apt-get -qq -o Acquire::Check-Valid-Until=false update &&
    apt-get install -y -qq --no-install-recommends python3-hypothesis' \
    >> "$cache/debootstrap.log" 2>&1 || echo "note: no hypothesis in the sid chroot"
  unmount_below "$new"
  $SUDO touch "$new/.complete"
  $SUDO mv "$new" "$chroot_dir"
  echo "sid chroot: built ($chroot_dir)"
}

run() {
  [ -f "$chroot_dir/.complete" ] || { echo "error: no sid chroot: bash .ci/sid.sh build"; return 1; }
  unmount_below "$chroot_dir"  # left by a run that was killed
  trap 'unmount_below "$chroot_dir"' EXIT
  trap 'exit 130' INT TERM
  $SUDO mkdir -p "$chroot_dir/src"
  $SUDO mount -t proc proc "$chroot_dir/proc"
  # /dev with what is mounted below it (/dev/pts, /dev/shm); as a slave, so that
  # unmounting it here never unmounts anything of the machine's own
  $SUDO mount --rbind /dev "$chroot_dir/dev"
  $SUDO mount --make-rslave "$chroot_dir/dev"
  $SUDO mount --bind "$checkout" "$chroot_dir/src"
  $SUDO mount --make-slave "$chroot_dir/src"
  local status=0
  in_chroot "$chroot_dir" sh -c 'cd /src && exec "$@"' sh "$@" || status=$?
  return "$status"
}

case "${1:-}" in
  build) build ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash .ci/sid.sh build | run COMMAND..."; exit 2 ;;
esac
