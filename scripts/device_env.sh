# Sourced by the device scripts (scripts/device_check.sh, scripts/device_scaling.sh): unbuffered output, $OUT made,
# and the wheels carried in .whl/ (what the lent machine's image lacks) installed into /tmp/site on PYTHONPATH.
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
