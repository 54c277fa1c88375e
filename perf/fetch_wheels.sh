#!/usr/bin/env bash
# Fetch, on this (networked) machine, the wheels the lent GPU lacks, into .whl/ (git-ignored);
# perf/gpu_check.sh installs them there when the device call carries ".whl".
# The device has Python 3.12 on x86-64, torch 2.11+cu130, transformers, httpx; no xformers,
# starlette, uvicorn, msgspec, prometheus-client, openai or pydantic (DESIGN.md, KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)  # (.git may be a file: a worktree)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$@"
}
fetch xformers==0.0.35
fetch starlette uvicorn h11 msgspec prometheus-client openai jiter distro sniffio
# perf/serve_bench.py's client: aiohttp and what it needs
fetch aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl
# openai 3.x talks through httpx2 (not the device's httpx), which needs newer anyio / idna too.
fetch httpx2 httpcore2 truststore anyio idna
# openai's models need pydantic (absent there); pydantic pins its compiled core exactly.
fetch pydantic annotated-types typing-inspection
core=$(unzip -p .whl/pydantic-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
fetch "pydantic-core==$core"
# LLM.int8() for the stages that run bitsandbytes (quant8b, quant): 43 MB of the 64 MB a call carries, so in a
# folder of its own, carried only by those calls (accelerate is there already).
grep -qx '/.whl-bnb/' "$exclude" 2>/dev/null || echo /.whl-bnb/ >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 -d .whl-bnb bitsandbytes==0.50.2
rm -f .whl/bitsandbytes-*.whl
ls -la .whl .whl-bnb
