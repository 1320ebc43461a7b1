#!/usr/bin/env bash
# Submit batch inference: jobs/submit_infer.sh [CONFIG] [FLAG ...]; see jobs/submit.sh for the environment it reads.
exec "$(dirname "${BASH_SOURCE[0]}")/submit.sh" infer "$@"
