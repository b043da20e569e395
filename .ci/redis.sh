#!/usr/bin/env bash
# Make sure a Redis answers for the tests, and print its URL (for RMSERVE_TEST_REDIS_URL) on stdout.
#
#   export RMSERVE_TEST_REDIS_URL="$(.ci/redis.sh)"
#
# A Redis already answering at 127.0.0.1:6379 is used as is. Otherwise redis-server (installed with
# apt-get when missing) is started on a free port, without persistence, daemonized; its pid file and
# log are under ${RMSERVE_CI_TMP:-/tmp}. Everything but the URL goes to stderr.
set -euo pipefail

tmp="${RMSERVE_CI_TMP:-/tmp}"

answers() {  # answers PORT: a PING gets +PONG (plain bash: no redis-cli needed)
    local reply=""
    { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    read -r -t 2 reply <&3 || true
    exec 3<&- 3>&-
    [[ "$reply" == "+PONG"* ]]
}

if answers 6379; then
    echo "redis.sh: Redis answers at 127.0.0.1:6379" >&2
    echo "redis://127.0.0.1:6379/0"
    exit 0
fi

if ! command -v redis-server >/dev/null 2>&1; then
    echo "redis.sh: redis-server missing; installing it with apt-get" >&2
    sudo=""
    if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >&2
    if answers 6379; then  # some images start the packaged service
        echo "redis://127.0.0.1:6379/0"
        exit 0
    fi
fi

port=""
for candidate in $(seq 6380 6480); do
    if ! answers "$candidate" && ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then
        port="$candidate"
        break
    fi
done
if [[ -z "$port" ]]; then
    echo "redis.sh: no free port in 6380-6480" >&2
    exit 1
fi

redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "$tmp/rmserve-ci-redis-$port.pid" --logfile "$tmp/rmserve-ci-redis-$port.log" >&2
for _ in $(seq 1 50); do
    if answers "$port"; then
        echo "redis.sh: started redis-server on 127.0.0.1:$port (pid file $tmp/rmserve-ci-redis-$port.pid)" >&2
        echo "redis://127.0.0.1:$port/0"
        exit 0
    fi
    sleep 0.1
done
echo "redis.sh: redis-server on port $port did not answer; log:" >&2
cat "$tmp/rmserve-ci-redis-$port.log" >&2 || true
exit 1
