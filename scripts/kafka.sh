#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, broker and controller in one JVM) for tests, CI
# and the demo, run from the Maven Central jars named in scripts/kafka/pom.xml. Needs only a
# JDK 17+, Maven and network access to Maven Central on first use.
#
# Usage: scripts/kafka.sh fetch|start|stop|restart|status|clean
#   fetch    download the broker's jars into .kafka/lib (skipped when they match the pom)
#   start    fetch if needed, format storage on first start, start the broker in the background
#            and wait until it serves; exits 0 at once if it is already running
#   stop     SIGTERM, then SIGKILL after KAFKA_STOP_TIMEOUT seconds; fine when not running
#   restart  stop, then start; topics and offsets survive (the data folder is kept)
#   status   exit 0 and print the bootstrap address if running, else exit 3
#   clean    stop, then delete this port's data, settings and log (the jars stay)
# On success start/restart/status print KAFKA_BOOTSTRAP=127.0.0.1:<port> as their last line.
#
# Environment: KAFKA_PORT (default 19092), KAFKA_CONTROLLER_PORT (default KAFKA_PORT+1),
# KAFKA_HEAP (default 512m), KAFKA_START_TIMEOUT (seconds, default 90), KAFKA_STOP_TIMEOUT
# (seconds, default 30), KAFKA_DIR (default <repo>/.kafka).
#
# Layout: .kafka/lib/*.jar, .kafka/broker-<port>/{server.properties,cluster.id,kafka.pid,data/},
# .kafka/logs/broker-<port>.log (the previous start's log is kept as .log.1).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
conf="$root/scripts/kafka"
kafka_dir=${KAFKA_DIR:-$root/.kafka}
port=${KAFKA_PORT:-19092}
controller_port=${KAFKA_CONTROLLER_PORT:-$((port + 1))}
heap=${KAFKA_HEAP:-512m}
start_timeout=${KAFKA_START_TIMEOUT:-90}
stop_timeout=${KAFKA_STOP_TIMEOUT:-30}

lib="$kafka_dir/lib"
state="$kafka_dir/broker-$port"
pid_file="$state/kafka.pid"
log_file="$kafka_dir/logs/broker-$port.log"
java_cmd=(java -Xms128m "-Xmx$heap" -XX:+UseG1GC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$conf/log4j2.properties" -cp "$lib/*")

say() { echo "kafka: $*" >&2; }
die() { say "$*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# The pid of this port's broker if it is alive (and really our java kafka.Kafka), else fails.
running_pid() {
  [ -f "$pid_file" ] || return 1
  local pid
  pid=$(cat "$pid_file")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "kafka.Kafka $state/server.properties" || return 1
  echo "$pid"
}

require_java() {
  command -v java >/dev/null 2>&1 || die "java not found; Kafka 4 needs a JDK 17 or newer"
  local major
  major=$(java -version 2>&1 | awk -F'"' '/version/ { split($2, v, "."); print v[1]; exit }')
  [ "${major:-0}" -ge 17 ] || die "java $major found; Kafka 4 needs 17 or newer"
}

fetch() {
  local want stamp="$lib/.pom-sha256"
  want=$(sha256sum "$conf/pom.xml" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found; it downloads the broker's jars"
  local t0 tmp="$kafka_dir/lib.tmp.$$"
  t0=$(now)
  say "downloading the broker's jars from Maven Central into $lib"
  trap "rm -rf $(printf %q "$tmp") $(printf %q "$tmp.log")" EXIT
  if ! mvn -q -B -f "$conf/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$tmp" -DincludeScope=runtime >"$tmp.log" 2>&1; then
    cat "$tmp.log" >&2
    die "mvn dependency:copy-dependencies failed"
  fi
  echo "$want" >"$tmp/.pom-sha256"
  rm -rf "$lib"
  mv "$tmp" "$lib"
  say "fetched $(find "$lib" -name '*.jar' | wc -l) jars in $(since "$t0")s"
}

write_config() {
  mkdir -p "$state/data" "$(dirname "$log_file")"
  sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$controller_port|g" \
    -e "s|@DATA_DIR@|$state/data|g" "$conf/server.properties" >"$state/server.properties"
  if [ ! -f "$state/data/meta.properties" ]; then
    if [ ! -s "$state/cluster.id" ]; then
      local id
      id=$("${java_cmd[@]}" kafka.tools.StorageTool random-uuid 2>>"$log_file" | tail -n 1) ||
        { tail -n 30 "$log_file" >&2; die "kafka.tools.StorageTool random-uuid failed"; }
      echo "$id" >"$state/cluster.id"
    fi
    "${java_cmd[@]}" kafka.tools.StorageTool format -t "$(cat "$state/cluster.id")" \
      -c "$state/server.properties" -g >>"$log_file" 2>&1 ||
      { tail -n 30 "$log_file" >&2; die "formatting $state/data failed"; }
  fi
}

# Waits until the broker logged its start and accepts connections; kills it on failure.
wait_ready() {
  local pid=$1 t0=$2
  local deadline=$(($(date +%s) + start_timeout))
  until grep -q "Kafka Server started" "$log_file" 2>/dev/null && port_open "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$log_file" >&2
      rm -f "$pid_file"
      die "broker exited during start-up (log: $log_file)"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 40 "$log_file" >&2
      stop
      die "broker not ready after ${start_timeout}s (log: $log_file)"
    fi
    sleep 0.2
  done
  say "started (pid $pid) in $(since "$t0")s; log: $log_file"
}

start() {
  local t0 pid
  t0=$(now)
  fetch
  if pid=$(running_pid); then
    if grep -q "Kafka Server started" "$log_file" 2>/dev/null && port_open "$port"; then
      say "already running (pid $pid) on 127.0.0.1:$port"
    else
      wait_ready "$pid" "$t0"
    fi
    echo "KAFKA_BOOTSTRAP=127.0.0.1:$port"
    return 0
  fi
  for p in "$port" "$controller_port"; do
    port_open "$p" && die "port $p is taken by a process this script did not start; set KAFKA_PORT"
  done
  require_java
  write_config
  [ -f "$log_file" ] && mv -f "$log_file" "$log_file.1"
  # setsid: the broker outlives the shell (and a Ctrl-C in the terminal) that started it.
  # 9>&-: the broker must not inherit (and so hold) this script's lock.
  setsid nohup "${java_cmd[@]}" kafka.Kafka "$state/server.properties" \
    >"$log_file" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$pid_file"
  wait_ready "$pid" "$t0"
  echo "KAFKA_BOOTSTRAP=127.0.0.1:$port"
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$pid_file"
    say "not running on port $port"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$(($(date +%s) + stop_timeout))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "pid $pid still alive after ${stop_timeout}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  rm -f "$pid_file"
  say "stopped (pid $pid)"
}

status() {
  local pid
  if pid=$(running_pid) && port_open "$port"; then
    say "running (pid $pid); log: $log_file"
    echo "KAFKA_BOOTSTRAP=127.0.0.1:$port"
    return 0
  fi
  say "not running on port $port"
  return 3
}

clean() {
  stop
  rm -rf "$state" "$log_file" "$log_file.1"
  say "removed $state"
}

# One command at a time per port (two test sessions starting the broker at once, say).
lock() {
  mkdir -p "$kafka_dir"
  exec 9>"$kafka_dir/.lock-$port"
  flock 9
}

case "${1:-}" in
  fetch) lock; fetch ;;
  start) lock; start ;;
  stop) lock; stop ;;
  restart) lock; stop; start ;;
  status) status ;;
  clean) lock; clean ;;
  *) echo "usage: $0 fetch|start|stop|restart|status|clean" >&2; exit 2 ;;
esac
