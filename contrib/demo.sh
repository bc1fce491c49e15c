#!/usr/bin/env bash
# nixspool end to end on a fresh Debian machine, as root:
#   install Nix and nixspool, build with nixspool-hook as Nix's post-build-hook,
#   flush the spool to a file:// binary cache, and show `nixspool status`.
#
# Everything it starts is its own: a nix-daemon on its own socket with its own
# nix.conf, and a config and spool under $DEMO (default /tmp/nixspool-demo).
# It changes neither /etc/nix/nix.conf nor /etc/nixspool. Run it again at will.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
demo=${DEMO:-/tmp/nixspool-demo}
venv=${NIXSPOOL_VENV:-/opt/nixspool}

if [ -t 1 ] && [ "${TERM:-dumb}" != dumb ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
say() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }

[ "$(id -u)" = 0 ] || { echo "demo.sh: run me as root (I install packages and start a nix-daemon)" >&2; exit 1; }

say "Installing Debian's Nix and Python venv support"
# nix-setup-systemd makes the nix-users group, the build users and /nix/var/nix;
# nix-bin only recommends it, and without it the daemon cannot open its store.
missing=()
for pkg in nix-bin nix-setup-systemd python3-venv; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
nix --version

say "Installing nixspool into $venv"
[ -x "$venv/bin/python3" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall "$here"
export PATH="$venv/bin:$PATH"

say "A nix-daemon whose post-build-hook is nixspool-hook (its own nix.conf and socket)"
# A daemon left by an interrupted earlier run: by its recorded PID, never by name.
if [ -f "$demo/nix/daemon.pid" ]; then kill "$(cat "$demo/nix/daemon.pid")" 2>/dev/null || true; fi
rm -rf "$demo"
mkdir -p "$demo/nix/etc" "$demo/nix/socket"
chmod 755 "$demo"
cat > "$demo/config.toml" <<EOF
spool = "$demo/spool/spool.sqlite"
run_as_root = true   # a demo as root, no SSH involved; normally: user = "alice"

[remotes.cache]
url = "file://$demo/cache"
EOF
cat > "$demo/nix/etc/nix.conf" <<EOF
post-build-hook = $venv/bin/nixspool-hook
substituters =
sandbox = false
experimental-features = nix-command
EOF
cat "$demo/nix/etc/nix.conf"
export NIXSPOOL_CONFIG="$demo/config.toml"
export NIX_CONF_DIR="$demo/nix/etc" NIX_DAEMON_SOCKET_PATH="$demo/nix/socket/socket"
nix-daemon >"$demo/nix/daemon.log" 2>&1 &
daemon=$!
echo "$daemon" >"$demo/nix/daemon.pid"
trap 'kill $daemon 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$NIX_DAEMON_SOCKET_PATH" ] && break; sleep 0.1; done

say "nixspool status (creates the spool)"
nixspool status

say "Building two derivations through the daemon"
cat > "$demo/hello.nix" <<'EOF'
{ nonce }: [
  (derivation { name = "hello-nixspool"; system = builtins.currentSystem; builder = "/bin/sh";
                args = [ "-c" "echo hello ${nonce} > $out" ]; })
  (derivation { name = "two-outputs"; system = builtins.currentSystem; builder = "/bin/sh";
                outputs = [ "out" "doc" ];
                args = [ "-c" "echo ${nonce} > $out; echo docs > $doc" ]; })
]
EOF
NIX_REMOTE=daemon nix-build --no-out-link "$demo/hello.nix" --argstr nonce "$(date +%s%N)"

say "The hook recorded them; nothing has been uploaded yet"
nixspool status

say "nixspool flush: resolve outputs, upload with nix copy"
nixspool flush

say "Delivered"
nixspool status
nixspool list
echo
find "$demo/cache" -maxdepth 1 -name "*.narinfo"
