#!/usr/bin/env bash
# Pack this machine's redis-server and the shared libraries it needs into .gpu/redis (git-ignored), for a
# machine without one (the GPU image has none): carry ".gpu/redis" with the device run and put
# .gpu/redis/bin on PATH there. bench/ceiling.py --workers N starts a redis-server of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
server=$(command -v redis-server) || { echo "no redis-server here: apt-get install redis-server" >&2; exit 1; }
out=.gpu/redis
rm -rf "$out" && mkdir -p "$out/bin" "$out/lib"
cp -L "$server" "$out/lib/redis-server"
# Every library it links but the C/C++ runtime, which any Linux has (newer is fine).
ldd "$server" | awk '/=> \//{print $3}' | grep -v -E '/lib(c|m|stdc\+\+|gcc_s|pthread|dl|rt)\.so' \
  | xargs -r -I{} cp -L {} "$out/lib/"
cat > "$out/bin/redis-server" <<'WRAP'
#!/bin/bash
# Its own libraries only for itself: vLLM and Python keep the machine's (libssl, libcrypto).
D=$(dirname "$(readlink -f "$0")")/..
LD_LIBRARY_PATH=$D/lib exec "$D/lib/redis-server" "$@"
WRAP
chmod +x "$out/bin/redis-server"
"$out/bin/redis-server" --version
du -sh "$out"
