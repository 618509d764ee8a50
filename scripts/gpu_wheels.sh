# Sourced by the GPU scripts (`. scripts/gpu_wheels.sh DIR [LOG]`, from the repository root): the device machine has
# PyTorch, transformers and accelerate but not all of vlv's dependencies and no network, so the wheels of DIR (made
# where there is network: scripts/gpu_stage1_wheels.sh, scripts/bench_gpu_wheels.sh) go into a fresh folder ahead of
# the machine's packages on PYTHONPATH, then this checkout. A missing DIR: the installed packages are used.
_wheels=${1:-.whl}; _log=${2:-/dev/null}
if compgen -G "$_wheels/*.whl" > /dev/null; then
  _site=$(mktemp -d /tmp/vlv-site-XXXXXX)
  echo "installing $(ls "$_wheels"/*.whl | wc -l) wheels from $_wheels into $_site" | tee -a "$_log"
  ${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$_site" "$_wheels"/*.whl 2>&1 | tail -3 | tee -a "$_log"
  export PYTHONPATH="$_site"
else
  echo "no $_wheels/ here: using the installed packages" | tee -a "$_log"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
