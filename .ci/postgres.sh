# shellcheck shell=bash
# Start a throw-away PostgreSQL server for reducer's registry tests and export
#   REDUCER_TEST_PG_URL=postgresql+psycopg2://USER:PASSWORD@127.0.0.1:PORT/DB
#
# Usage (Debian/Ubuntu, as root or with sudo):
#   source .ci/postgres.sh                 # exports REDUCER_TEST_PG_URL in this shell
#   eval "$(bash .ci/postgres.sh)"         # same, when it cannot be sourced
#
# What it does (idempotent: running it again only makes sure the server is up):
#   * installs the `postgresql` package with apt-get (quietly, noninteractive) when no
#     server is installed, or always with REDUCER_PG_APT=1;
#   * creates a dedicated cluster "$REDUCER_PG_CLUSTER" (default reducer_test) of the
#     newest installed major version with pg_createcluster, listening only on
#     127.0.0.1:$REDUCER_PG_PORT (default 55432); it is a test cluster, so fsync is off;
#   * starts it with pg_ctlcluster (the server itself runs as the `postgres` user);
#   * creates (or resets the password of) the login role and the database it owns.
# Settings (environment): REDUCER_PG_CLUSTER, REDUCER_PG_PORT, REDUCER_PG_USER,
# REDUCER_PG_PASSWORD, REDUCER_PG_DB (letters, digits and '_' only).
#
# Sourced, it never changes the caller's shell options: the work runs in a separate
# bash process (with set -euo pipefail); a failure makes `source` return 1 and leaves
# REDUCER_TEST_PG_URL as it was.

_reducer_pg_setup() (
    set -euo pipefail
    # Only the URL line goes to stdout; the tools' chatter goes to stderr (pg_ctlcluster
    # prints "Removed stale pid file." on stdout).  No extra descriptor is opened: the
    # server started here would inherit it and keep the caller's $(...) waiting.
    cluster=${REDUCER_PG_CLUSTER:-reducer_test}
    port=${REDUCER_PG_PORT:-55432}
    user=${REDUCER_PG_USER:-reducer_test}
    password=${REDUCER_PG_PASSWORD:-reducer_test}
    db=${REDUCER_PG_DB:-reducer_test}
    for v in "$cluster" "$user" "$password" "$db"; do
        [[ $v =~ ^[A-Za-z0-9_]+$ ]] || { echo "postgres.sh: '$v': use letters, digits and _ only" >&2; exit 1; }
    done
    [[ $port =~ ^[0-9]+$ ]] || { echo "postgres.sh: bad port '$port'" >&2; exit 1; }

    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "postgres.sh: run as root (or install sudo)" >&2; exit 1; }
        sudo=(sudo)
    fi
    log() { echo "postgres.sh: $*" >&2; }

    # 1. the server packages
    if [[ ${REDUCER_PG_APT:-0} == 1 ]] || ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null \
            || ! command -v pg_createcluster >/dev/null; then
        log "installing postgresql with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        "${sudo[@]}" apt-get update -qq >/dev/null
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    fi
    version=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' | awk -F/ '{print $5}' | sort -n | tail -1)
    [[ -n $version ]] || { log "no PostgreSQL server found under /usr/lib/postgresql"; exit 1; }
    "${sudo[@]}" install -d -o postgres -g postgres -m 2775 /var/run/postgresql

    # 2. the cluster, listening on 127.0.0.1 only
    if ! "${sudo[@]}" pg_lsclusters -h | awk -v v="$version" -v c="$cluster" '$1 == v && $2 == c {f = 1} END {exit !f}'; then
        log "creating cluster $version/$cluster on 127.0.0.1:$port"
        "${sudo[@]}" pg_createcluster --port="$port" "$version" "$cluster" >/dev/null
    fi
    # (Re)apply the settings, so that an existing cluster is fixed too.  They go to a
    # conf.d drop-in: pg_conftool would write listen_addresses = 127.0.0.1 unquoted.
    confdir=/etc/postgresql/$version/$cluster
    "${sudo[@]}" pg_conftool -s "$version" "$cluster" set port "$port"
    if ! grep -Eq "^[[:space:]]*include_dir[[:space:]]*=[[:space:]]*'conf.d'" "$confdir/postgresql.conf"; then
        echo "include_dir = 'conf.d'" | "${sudo[@]}" tee -a "$confdir/postgresql.conf" >/dev/null
    fi
    "${sudo[@]}" install -d -o postgres -g postgres "$confdir/conf.d"
    "${sudo[@]}" tee "$confdir/conf.d/90-reducer-test.conf" >/dev/null <<CONF
# written by reducer's .ci/postgres.sh: a throw-away test server
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
    status=0
    "${sudo[@]}" pg_ctlcluster "$version" "$cluster" status >/dev/null 2>&1 || status=$?
    if [[ $status -eq 0 ]]; then
        running=$("${sudo[@]}" su postgres -c "psql -X -At -p $port -c 'show listen_addresses'" 2>/dev/null || true)
        if [[ $running != 127.0.0.1 ]]; then
            log "restarting cluster $version/$cluster to apply its settings"
            "${sudo[@]}" pg_ctlcluster "$version" "$cluster" restart >&2
        fi
    else
        log "starting cluster $version/$cluster"
        "${sudo[@]}" pg_ctlcluster "$version" "$cluster" start >&2
    fi
    for _ in $(seq 1 30); do
        pg_isready -q -h 127.0.0.1 -p "$port" && break
        sleep 1
    done
    pg_isready -q -h 127.0.0.1 -p "$port" || { log "server on 127.0.0.1:$port is not ready"; exit 1; }

    # 3. role and database (names are checked above, so quoting is safe)
    psql_admin() { "${sudo[@]}" su postgres -c "psql -X -q -v ON_ERROR_STOP=1 -p $port $*"; }
    psql_admin "-d postgres" >/dev/null <<SQL
DO \$\$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$user') THEN
        CREATE ROLE $user LOGIN PASSWORD '$password';
    ELSE
        ALTER ROLE $user LOGIN PASSWORD '$password';
    END IF;
END
\$\$;
SQL
    if [[ $(psql_admin "-d postgres -At -c \"SELECT 1 FROM pg_database WHERE datname = '$db'\"") != 1 ]]; then
        log "creating database $db"
        psql_admin "-d postgres -c 'CREATE DATABASE $db OWNER $user'" >/dev/null
    fi

    # 4. check the password login the tests will use
    PGPASSWORD=$password psql -X -q -h 127.0.0.1 -p "$port" -U "$user" -d "$db" -At -c 'SELECT 1' >/dev/null \
        || { log "cannot log in as $user on 127.0.0.1:$port/$db"; exit 1; }
    echo "URL=postgresql+psycopg2://$user:$password@127.0.0.1:$port/$db"
)

# The setup runs in a new bash process: `set -e` is silently ignored in a function or
# subshell called from an if/||/&& context (as in `source .ci/postgres.sh || ...`),
# but not in another process.
_reducer_pg_out=$(
    REDUCER_PG_CLUSTER=${REDUCER_PG_CLUSTER:-} REDUCER_PG_PORT=${REDUCER_PG_PORT:-} \
    REDUCER_PG_USER=${REDUCER_PG_USER:-} REDUCER_PG_PASSWORD=${REDUCER_PG_PASSWORD:-} \
    REDUCER_PG_DB=${REDUCER_PG_DB:-} REDUCER_PG_APT=${REDUCER_PG_APT:-} \
        bash -c "$(declare -f _reducer_pg_setup); _reducer_pg_setup"
    echo "rc=$?"
)
if [[ $_reducer_pg_out == *rc=0 ]]; then
    # the line that starts with URL=, whatever else reached stdout
    _reducer_pg_out=$(printf '%s\n' "$_reducer_pg_out" | sed -n 's/^URL=//p' | tail -1)
    export REDUCER_TEST_PG_URL="$_reducer_pg_out"
    echo "postgres.sh: REDUCER_TEST_PG_URL=$REDUCER_TEST_PG_URL" >&2
    if [[ ${BASH_SOURCE[0]} == "$0" ]]; then  # executed, not sourced: print for eval
        printf 'export REDUCER_TEST_PG_URL=%q\n' "$REDUCER_TEST_PG_URL"
    fi
    unset -f _reducer_pg_setup
    unset _reducer_pg_out
else
    echo "postgres.sh: PostgreSQL setup failed" >&2
    unset -f _reducer_pg_setup
    unset _reducer_pg_out
    # shellcheck disable=SC2317
    return 1 2>/dev/null || exit 1
fi
