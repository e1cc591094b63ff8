#!/usr/bin/env bash
# Builds the comparison environment for benchmarks/aio_vs_deepspeed.py: DeepSpeed in its own virtual
# environment (default ../dsvenv, outside the checkout), with its async_io op compiled (about 3 minutes).
# Benchmark-only: DeepSpeed is never a dependency of infinity or of its tests.
set -euo pipefail
VENV=${1:-$(cd "$(dirname "$0")/../.." && pwd)/dsvenv}
[ -e /usr/include/libaio.h ] || { apt-get update -qq && apt-get install -y -qq libaio-dev; }
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 numpy
"$VENV/bin/pip" install -q deepspeed
(cd /tmp && "$VENV/bin/python" -c "from deepspeed.ops.op_builder import AsyncIOBuilder; AsyncIOBuilder().load()")
echo "DeepSpeed's aio op is built in $VENV"
