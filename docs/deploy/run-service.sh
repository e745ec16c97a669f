#!/bin/sh
# The image's services run under this (compose's worker, beat, results, sandbox, Flower):
#   run-service COMMAND [ARG...]
# It runs COMMAND, passes on the signals Docker sends (SIGTERM: Celery's warm
# shutdown) and exits with COMMAND's status, except one: 78 (EX_CONFIG, a setting
# is wrong; COMMAND said which, in one line). Restarting cannot fix that, so it
# says so and exits 0, which `restart: on-failure` leaves stopped instead of
# restarting it in a loop. A one-off `docker compose run worker fulfilment ...`
# replaces the command, so it does not pass through here and keeps its exit code.
set -u
# The traps first: a signal that comes as the command starts is passed on, not taken by
# this shell (which would end with 143 and leave the command without its warm shutdown).
child=
for signal in TERM INT QUIT HUP USR1; do
  trap "[ -n \"\$child\" ] && kill -s $signal \$child 2>/dev/null" "$signal"
done
exec 3<&0                     # a background job's stdin would be /dev/null
"$@" <&3 3<&- &
child=$!
exec 3<&-
status=0
wait "$child" || status=$?
# wait returns early (status above 128) when a signal arrives: wait for COMMAND itself.
while kill -0 "$child" 2>/dev/null; do
  status=0
  wait "$child" || status=$?
done
if [ "$status" -eq 78 ]; then
  echo "run-service: $1 stopped on a configuration error (exit 78, said above); it is not" \
       "restarted: fix the setting, then docker compose up -d" >&2
  exit 0
fi
exit "$status"
