# Source on a GPU machine without network, from the repository root: installs the wheels
# of `benchmarks/device_wheels.sh` (in .whl/) into /tmp/site, puts the checkout and them on
# PYTHONPATH and a `dsv4` command on PATH (no pip install of the package needed).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p /tmp/bin
printf '#!/bin/sh\nexec python3 -m dsv4.cli "$@"\n' > /tmp/bin/dsv4 && chmod +x /tmp/bin/dsv4
export PATH=/tmp/bin:$PATH
