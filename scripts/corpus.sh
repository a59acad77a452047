#!/usr/bin/env bash
# Assembles the default English corpus from Debian packages into .cache/corpus/ (or $KVD_CORPUS_DIR):
#
#   gcide/gcide.txt    dict-gcide: the Collaborative International Dictionary of English (~40 MB of
#                      text; the package ships a dictzip'ed dictd database, which is plain gzip; three
#                      stray cp1252 bytes in it are converted to UTF-8)
#   python-doc/**.rst  python3.X-doc: the reST sources of the Python documentation (the package ships
#                      them as html/_sources/**/*.rst.txt; ~12 MB)
#   linux-doc/**.rst   linux-source-X.Y: Documentation/**/*.rst from the kernel source tarball, without
#                      Documentation/translations/ (English only; ~28 MB)
#   MANIFEST           package versions, file counts and bytes of each part
#
# Packages are fetched with `apt-get download` and unpacked with `dpkg -x` into a scratch directory
# (nothing is installed, no root needed unless the apt lists must be refreshed); a package already
# installed on the machine is read in place. Idempotent: a part is rebuilt only when its package
# version changed or its output is missing. Usage: scripts/corpus.sh [--clean]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${KVD_CORPUS_DIR:-.cache/corpus}
say() { printf '\033[1m[corpus]\033[0m %s\n' "$*" >&2; }
die() { echo "corpus: $*" >&2; exit 1; }

if [ "${1:-}" = "--clean" ]; then rm -rf "$OUT"; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvd-corpus.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

for tool in apt-get apt-cache dpkg dpkg-deb tar xz gzip iconv; do
  command -v "$tool" >/dev/null || die "'$tool' not found; this script needs a Debian-based system"
done

# Candidate version of a package; refreshes the apt lists once if the package is unknown.
refreshed=0
candidate() {
  local v
  v=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
  if { [ -z "$v" ] || [ "$v" = "(none)" ]; } && [ $refreshed -eq 0 ]; then
    refreshed=1
    say "apt does not know $1; running apt-get update"
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq || die "apt-get update failed; check the network or /etc/apt/sources.list"
    v=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
  fi
  { [ -n "$v" ] && [ "$v" != "(none)" ]; } || die "package $1 is not available from apt on this machine"
  echo "$v"
}

# The versioned package a metapackage depends on, e.g. linux-source -> linux-source-6.1.
resolve() {  # <metapackage> <regex of the versioned name>
  candidate "$1" >/dev/null
  apt-cache depends "$1" 2>/dev/null | awk '/Depends:/ {print $2}' | grep -E "$2" | head -n1
}

# Prints a root directory where the files of package $1 can be read: / if installed, else unpacked.
unpack() {
  local pkg=$1
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed"; then
    echo /
    return
  fi
  say "downloading $pkg (apt-get download; nothing is installed)"
  (cd "$WORK" && apt-get download -q "$pkg" >/dev/null 2>"$WORK/apt.err") ||
    die "apt-get download $pkg failed: $(tail -n1 "$WORK/apt.err")"
  local deb
  deb=$(ls "$WORK"/"${pkg}"_*.deb | head -n1)
  mkdir -p "$WORK/root-$pkg"
  dpkg -x "$deb" "$WORK/root-$pkg"
  rm -f "$deb"
  echo "$WORK/root-$pkg"
}

# A part is current when its marker holds this package version and its directory is non-empty.
current() {  # <part> <package> <version>
  [ "$(cat "$OUT/.$1.version" 2>/dev/null)" = "$2 $3" ] && [ -n "$(ls -A "$OUT/$1" 2>/dev/null)" ]
}
finish_part() {  # <part> <package> <version>
  echo "$2 $3" > "$OUT/.$1.version"
  local files bytes
  files=$(find "$OUT/$1" -type f | wc -l)
  bytes=$(find "$OUT/$1" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  say "$1: $files files, $((bytes / 1000000)) MB (from $2 $3)"
}

# --- 1. dict-gcide ----------------------------------------------------------------------------------
PKG=dict-gcide
VER=$(candidate $PKG)
if current gcide $PKG "$VER"; then
  say "gcide: up to date ($PKG $VER)"
else
  root=$(unpack $PKG)
  dz="$root/usr/share/dictd/gcide.dict.dz"
  [ -f "$dz" ] || die "$PKG does not contain usr/share/dictd/gcide.dict.dz"
  rm -rf "$OUT/gcide" && mkdir -p "$OUT/gcide"
  gzip -dc "$dz" | iconv -f cp1252 -t utf-8 > "$OUT/gcide/gcide.txt.part"
  mv "$OUT/gcide/gcide.txt.part" "$OUT/gcide/gcide.txt"
  finish_part gcide $PKG "$VER"
fi

# --- 2. Python documentation reST sources ---------------------------------------------------------
PKG=$(resolve python3-doc '^python3\.[0-9]+-doc$')
[ -n "$PKG" ] || die "cannot find the python3.X-doc package that python3-doc depends on"
VER=$(candidate "$PKG")
if current python-doc "$PKG" "$VER"; then
  say "python-doc: up to date ($PKG $VER)"
else
  root=$(unpack "$PKG")
  src=$(ls -d "$root"/usr/share/doc/python3*/html/_sources 2>/dev/null | head -n1)
  [ -n "$src" ] || die "$PKG has no usr/share/doc/python3*/html/_sources"
  rm -rf "$OUT/python-doc" && mkdir -p "$OUT/python-doc"
  (cd "$src" && find . -name '*.rst.txt' -print0) | while IFS= read -r -d '' f; do
    dst="$OUT/python-doc/${f%.txt}"
    mkdir -p "$(dirname "$dst")"
    cp "$src/$f" "$dst"
  done
  finish_part python-doc "$PKG" "$VER"
fi

# --- 3. Linux kernel Documentation/*.rst ------------------------------------------------------------
PKG=$(resolve linux-source '^linux-source-[0-9.]+$')
[ -n "$PKG" ] || die "cannot find the linux-source-X.Y package that linux-source depends on"
VER=$(candidate "$PKG")
if current linux-doc "$PKG" "$VER"; then
  say "linux-doc: up to date ($PKG $VER)"
else
  root=$(unpack "$PKG")
  tarball=$(ls "$root"/usr/src/linux-source-*.tar.xz 2>/dev/null | head -n1)
  [ -n "$tarball" ] || die "$PKG has no usr/src/linux-source-*.tar.xz"
  top=$(basename "$tarball" .tar.xz)
  say "extracting $top/Documentation/**/*.rst (xz; about 20 s)"
  rm -rf "$OUT/linux-doc" && mkdir -p "$OUT/linux-doc" "$WORK/linux"
  tar -xJf "$tarball" -C "$WORK/linux" --wildcards --exclude="$top/Documentation/translations/*" \
      "$top/Documentation/*.rst"
  (cd "$WORK/linux/$top/Documentation" && find . -name '*.rst' -exec cp --parents -t "$OUT/linux-doc/" {} +)
  finish_part linux-doc "$PKG" "$VER"
fi

{
  echo "# kvdistill default corpus (scripts/corpus.sh); part package version files bytes"
  for part in gcide python-doc linux-doc; do
    echo "$part $(cat "$OUT/.$part.version") $(find "$OUT/$part" -type f | wc -l) $(find "$OUT/$part" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')"
  done
} > "$OUT/MANIFEST"
say "done: $OUT ($(du -sh "$OUT" | cut -f1))"
