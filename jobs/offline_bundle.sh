#!/usr/bin/env bash
# Wheels for nodes without a package index (see jobs/offline_bundle.py and the README's cluster section):
#
#   jobs/offline_bundle.sh PYTHON_VERSION OUT [--have FREEZE_FILE] [--format tar.xz|wheels] [--max-mib N]
#
# Run on a connected machine; copy OUT to the target and run the install command it prints (also in
# OUT/INSTALL.txt). PYTHON: the local Python whose pip downloads (default: python3).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/offline_bundle.py" "$@"
