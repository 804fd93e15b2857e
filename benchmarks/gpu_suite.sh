#!/usr/bin/env bash
# The GPU run: every `gpu`-marked test and the GPU benchmarks, from the repository root of a checkout on a
# CUDA machine that has torch, torch-geometric and Lightning but not threefold's heavy extras.
#   bash benchmarks/gpu_suite.sh OUT_DIR ["benchmark [args]" ...]     e.g. "pointops --device cuda"
# Pure-Python wheels that machine lacks (monai, nibabel) may be put in .whl/ beforehand; they are installed
# into a private folder. threefold itself is imported from this checkout (the repository root is the package).
set -uo pipefail
out=${1:-gpu-out}; shift || true
mkdir -p "$out"
site=/tmp/threefold-site
mkdir -p "$site"
ln -sfn "$PWD" "$site/threefold"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, torch_geometric, lightning; print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| torch-geometric', torch_geometric.__version__, '| lightning', lightning.__version__)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
python3 -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$out/gpu-tests.log"
for entry in "$@"; do
  read -r bench args <<< "$entry"
  echo "== benchmarks/$bench.py $args"
  # shellcheck disable=SC2086  # args are words on purpose
  timeout 900 python3 "benchmarks/$bench.py" $args > "$out/bench-$bench.txt" 2>&1
  tail -40 "$out/bench-$bench.txt"
done
