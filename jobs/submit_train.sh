#!/usr/bin/env bash
# Submit training: jobs/submit_train.sh [CONFIG] [FLAG ...]; see jobs/submit.sh for the environment it reads.
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" train "$@"
