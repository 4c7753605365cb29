#!/usr/bin/env bash
# Run test files as parallel pytest processes (Triton compiles are CPU-bound; one GPU suffices).
# Usage: par_pytest.sh LOG_DIR FILE...   Each file logs to LOG_DIR/pytest_<name>.log; a summary of
# failures and counts is printed at the end, and the exit status is 1 if any file failed. On
# SIGTERM (a time limit) the children are stopped and the summary of what ran is still printed.
set -u
logdir=$1; shift
pids=()
summary() {
  for f in "$@"; do
    echo "--- $f"
    grep -E "^(FAILED|ERROR)|passed|failed|no tests ran" "$logdir/pytest_$(basename "$f" .py).log" \
      | grep -v PASSED | tail -n 12
    echo "    $(grep -c PASSED "$logdir/pytest_$(basename "$f" .py).log") PASSED lines"
  done
}
trap 'kill "${pids[@]}" 2>/dev/null; sleep 1; summary "$@"; exit 124' TERM
for f in "$@"; do
  python3 -m pytest -v -rfE --tb=short -p no:cacheprovider "$f" > "$logdir/pytest_$(basename "$f" .py).log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done   # `wait a b` reports only b's status
summary "$@"
exit $rc
