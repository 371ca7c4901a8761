#!/usr/bin/env bash
# Mutation testing of the numeric core with mutmut (a dev tool, not a dependency):
#   bash scripts/mutation.sh [COMMIT] [OUT_DIR] [NAMES_FILE]
# checks COMMIT (default HEAD) out into a scratch worktree, mutates the modules below one
# mutant at a time and runs the tests that cover each mutated function; prints and writes
# OUT_DIR/mutation-COMMIT.json: killed, survived, no tests, timeouts, kill rate.
# "Killed / (killed + survived)" counts every survivor as a miss, equivalent mutants included
# (e.g. device=None or dtype=None on a CPU-only run, a default argument passed explicitly).
# NAMES_FILE: only the mutants named there, one name or fnmatch pattern per line (a rerun of a
# previous run's survivors and unchecked mutants after tests were added).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
commit=${1:-HEAD}
out=$(realpath -m "${2:-$here/results/mutation}")
names=()
if [ -n "${3:-}" ]; then mapfile -t names < "$(realpath "$3")"; fi
sha=$(git -C "$here" rev-parse --short "$commit")
work=$(mktemp -d /tmp/gaussdiff-mutation.XXXXXX)
git -C "$here" worktree add -f --detach "$work/tree" "$commit" >/dev/null
mkdir -p "$out"
trap 'cp "$work/run.log" "$out/mutation-$sha-run.log" 2>/dev/null || true; git -C "$here" worktree remove --force "$work/tree"; rm -rf "$work"' EXIT
cd "$work/tree"
modules="gaussdiff/diffusion/process.py gaussdiff/sampling/samplers.py gaussdiff/diffusion/precond.py gaussdiff/sampling/guidance.py gaussdiff/metrics/frechet.py"
tests=""
for t in test_diffusion test_samplers test_objectives test_guidance test_metrics test_schedules \
         test_ode_likelihood test_guided_diffusion_parity test_hardening; do
  for f in tests/$t.py tests/*/$t.py; do [ -f "$f" ] && tests="$tests $f"; done   # flat or grouped
done
{   # setup.cfg lists: one item per indented line
  echo "[mutmut]"
  echo "source_paths = gaussdiff/"
  echo "only_mutate ="
  for m in $modules; do echo "    $m"; done
  echo "pytest_add_cli_args_test_selection ="
  for t in $tests; do echo "    $t"; done
} > setup.cfg
"$here/.venv/bin/pip" show mutmut >/dev/null 2>&1 || "$here/.venv/bin/pip" install -q mutmut==3.8.1
OMP_NUM_THREADS=1 "$here/.venv/bin/mutmut" run "${names[@]}" >"$work/run.log" 2>&1 || true
"$here/.venv/bin/mutmut" results --all true >"$work/results.txt" 2>/dev/null || true
mkdir -p "$out"
"$here/.venv/bin/python" - "$work/results.txt" "$out/mutation-$sha.json" "$sha" "$modules" <<'EOF'
import collections, json, sys
counts = collections.Counter(line.rsplit(":", 1)[1].strip() for line in open(sys.argv[1]) if ":" in line)
killed, survived = counts.get("killed", 0), counts.get("survived", 0)
result = {"commit": sys.argv[3], "modules": sys.argv[4].split(), "counts": dict(counts),
          "kill_rate": killed / max(1, killed + survived)}
json.dump(result, open(sys.argv[2], "w"), indent=1)
print(json.dumps(result))
EOF
cp "$work/results.txt" "$out/mutation-$sha-survivors.txt"
grep -v ": killed" "$out/mutation-$sha-survivors.txt" > "$out/mutation-$sha-survivors.tmp" || true
mv "$out/mutation-$sha-survivors.tmp" "$out/mutation-$sha-survivors.txt"
