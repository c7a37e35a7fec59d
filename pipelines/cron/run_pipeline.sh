#!/usr/bin/env bash
# Cron wrapper for `hymirec pipeline run`: one run at a time, one log file per run.
#
#   pipelines/cron/run_pipeline.sh [extra `hymirec pipeline run` options, e.g. --set train.epochs=2]
#
# Settings (environment variables, all optional):
#   HYMIREC_BIN          the hymirec command                    (default: hymirec on PATH)
#   HYMIREC_PROFILE      config profile(s), comma-separated     (default: local)
#   HYMIREC_PROJECT_DIR  directory to run in; relative paths in the config
#                        (paths.work_dir: ./hymirec-work) resolve against it (default: current dir)
#   HYMIREC_LOG_DIR      where run logs go                      (default: <project dir>/hymirec-work/logs)
#   HYMIREC_LOCK_FILE    the lock shared by all runs            (default: <log dir>/pipeline.lock)
#   HYMIREC_RUN_DATE     logical run date passed as --run-date  (default: today, UTC)
#   HYMIREC_TIMEOUT      stop a run after this long, e.g. 6h    (default: no limit; needs coreutils timeout)
#   HYMIREC_KEEP_DAYS    delete run logs older than this        (default: 30; 0 keeps all)
#
# Exit codes: the pipeline's own code (0 success, 1 a stage failed, 2 configuration
# error), 75 another run holds the lock (nothing was run), 124 HYMIREC_TIMEOUT hit,
# 127 hymirec not found, 64 a setting is unusable.
#
# Success prints one line (the log path) on stdout; failures and lock contention go to
# stderr, so a crontab that sends stdout to /dev/null mails only the problems.

set -uo pipefail

readonly EXIT_LOCKED=75
readonly EXIT_USAGE=64
readonly EXIT_NOT_FOUND=127

die() { echo "hymirec-cron: $2" >&2; exit "$1"; }

project_dir=${HYMIREC_PROJECT_DIR:-$PWD}
cd "$project_dir" || die "$EXIT_USAGE" "cannot cd to HYMIREC_PROJECT_DIR=$project_dir"
bin=${HYMIREC_BIN:-hymirec}
profile=${HYMIREC_PROFILE:-local}
log_dir=${HYMIREC_LOG_DIR:-$project_dir/hymirec-work/logs}
lock_file=${HYMIREC_LOCK_FILE:-$log_dir/pipeline.lock}
run_date=${HYMIREC_RUN_DATE:-$(date -u +%Y-%m-%d)}
keep_days=${HYMIREC_KEEP_DAYS:-30}

command -v flock >/dev/null 2>&1 || die "$EXIT_USAGE" "flock not found (util-linux); it keeps runs from overlapping"
command -v "$bin" >/dev/null 2>&1 || die "$EXIT_NOT_FOUND" "'$bin' not found: activate the venv, add it to PATH or set HYMIREC_BIN"
mkdir -p "$log_dir" "$(dirname "$lock_file")" || die "$EXIT_USAGE" "cannot create $log_dir"

# The lock lives on fd 9 for the life of this shell and of the run it starts; the kernel
# drops it when both have exited, however they exit (no stale lock files to clean up).
exec 9>>"$lock_file" || die "$EXIT_USAGE" "cannot open lock file $lock_file"
if ! flock -n 9; then
    die "$EXIT_LOCKED" "another pipeline run holds $lock_file; not starting a second one (exit $EXIT_LOCKED)"
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
log_file="$log_dir/pipeline-$stamp-$$.log"
cmd=("$bin" pipeline run --profile "$profile" --run-date "$run_date" "$@")
if [[ -n ${HYMIREC_TIMEOUT:-} ]]; then
    cmd=(timeout --signal=TERM --kill-after=120 "$HYMIREC_TIMEOUT" "${cmd[@]}")
fi

start=$(date +%s)
{
    echo "# hymirec pipeline run on $(hostname) at $(date -u +%Y-%m-%dT%H:%M:%SZ) (pid $$)"
    echo "# cwd: $PWD"
    printf '# command:'; printf ' %q' "${cmd[@]}"; echo
} >"$log_file"

"${cmd[@]}" >>"$log_file" 2>&1 </dev/null
rc=$?

echo "# exit code $rc after $(( $(date +%s) - start ))s" >>"$log_file"
if [[ $keep_days -gt 0 ]]; then
    find "$log_dir" -maxdepth 1 -name 'pipeline-*.log' -mtime "+$keep_days" -delete 2>/dev/null || true
fi

if [[ $rc -ne 0 ]]; then
    reason="failed"
    [[ $rc -eq 124 && -n ${HYMIREC_TIMEOUT:-} ]] && reason="timed out after $HYMIREC_TIMEOUT"
    {
        echo "hymirec-cron: pipeline run $reason (exit $rc); log: $log_file"
        echo "---- last lines of the log ----"
        tail -n 30 "$log_file"
    } >&2
    exit "$rc"
fi
echo "hymirec-cron: pipeline run succeeded; log: $log_file"
