#!/bin/sh
# deps.sh: install the Debian packages remarket needs to build, test and
# benchmark, but only those that are missing. Called by `make check`,
# `make demo` and `make bench`, so the README's commands work on a fresh
# Debian machine. Usage: scripts/deps.sh [build|test|bench|shop]
set -eu
want="build-essential pkg-config libfcgi-dev libsqlite3-dev libcurl4-openssl-dev libsodium-dev libssl-dev sqlite3 curl"
case "${1:-build}" in
  test)  want="$want clang-14 libclang-rt-14-dev nginx-light postfix valgrind perl python3 python3-cryptography apache2 lighttpd chromium chromium-driver fonts-dejavu-core tidy" ;;
  bench) want="$want nginx-light postfix wrk bc" ;;
  shop)  want="$want nginx-light python3" ;;
esac
# tidy validates the rendered mails (tests/48-templates.t); SpamAssassin is
# left out (some 40 packages and a perl upgrade): that test scores mails
# when REMARKET_SPAMASSASSIN names one, or spamassassin is on PATH
# the bench's hook probe and slow relay are python3; /usr/bin/time gives RSS
[ "${1:-build}" != bench ] || want="$want python3 time"
missing=""
for p in $want; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "deps.sh: installing$missing" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
# Installed packages must not start their services: the tests start their
# own servers on free ports, and apache2 and lighttpd would both want :80.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
	printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
	$sudo chmod +x "$policy"
	trap '$sudo rm -f "$policy"' EXIT
fi
$sudo apt-get update -qq
# postfix is wanted only for its smtp-sink test server; it must not ask questions.
echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections 2>/dev/null || true
$sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
