#!/usr/bin/env bash
# Submit a rayimgcls job to the Ray cluster at RAY_ADDRESS with `ray job submit`, and follow its logs:
#
#   jobs/submit.sh train [CONFIG] [FLAG ...]   ->  python -m rayimgcls.train --config CONFIG FLAG ...
#   jobs/submit.sh infer [CONFIG] [FLAG ...]   ->  python -m rayimgcls infer --config CONFIG FLAG ...
#
# CONFIG defaults to jobs/train.yaml / jobs/infer.yaml. It is a file in this checkout (the checkout travels as
# the job's working_dir, so the job finds it at the same relative path) or an s3:// URI. FLAGs override it.
#
# Environment:
#   RAY_ADDRESS     required: the cluster's dashboard, e.g. http://127.0.0.1:8265 (`ray dashboard cluster/aws.yaml`)
#   RAY_AUTH_MODE   default token. Ray 2.60 clusters check a token, but the `ray` client sends it only when
#                   RAY_AUTH_MODE=token; it then reads RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or
#                   ~/.ray/auth_token. Set RAY_AUTH_MODE=disabled only for a cluster started without a token.
#   RUNTIME_ENV     default jobs/runtime_env.yaml; this shell's AWS_* S3 settings are added to its env_vars.
#   SUBMISSION_ID   optional job id (ray job submit --submission-id).
#   PYTHON          the local Python that has Ray (default: python).
# The exit status is that of `ray job submit`: 0 when the job succeeded (or was stopped with `ray job stop`),
# 1 when it failed.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}

die() {
    echo "error: $*" >&2
    exit 2
}

kind=${1:-}
case $kind in
    train) entrypoint=(python -m rayimgcls.train) ;;
    infer) entrypoint=(python -m rayimgcls infer) ;;
    *) die "usage: $0 train|infer [CONFIG] [FLAG ...]" ;;
esac
shift
config=$repo/jobs/$kind.yaml
if [[ $# -gt 0 && $1 != -* ]]; then
    config=$1
    shift
fi

# The job runs in the uploaded checkout: a local config must lie inside it, named relative to its root.
if [[ $config != *://* ]]; then
    [[ -f $config ]] || die "config file $config not found"
    abs=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
    [[ $abs == "$repo"/* ]] || die "config file $config lies outside $repo, which is all the job receives; \
copy it into the checkout or put it on S3"
    config=${abs#"$repo"/}
fi

[[ -n ${RAY_ADDRESS:-} ]] || die "RAY_ADDRESS is not set: the cluster's dashboard address, e.g. \
http://127.0.0.1:8265 (run \`ray dashboard cluster/aws.yaml\` for a tunnel to a cluster launched with ray up)"

export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [[ $RAY_AUTH_MODE == token && -z ${RAY_AUTH_TOKEN:-} && ! -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
    die "no Ray auth token: put the cluster's token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN \
(\`ray get-auth-token\` on the head prints it; KubeRay keeps it in a Secret)"
fi

cd "$repo"
runtime_env=$(mktemp)  # mode 0600: it may hold S3 credentials, which must not show in `ps` either
trap 'rm -f "$runtime_env"' EXIT
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m rayimgcls.runtime "${RUNTIME_ENV:-jobs/runtime_env.yaml}" \
    >"$runtime_env"

submit=(ray job submit --address "$RAY_ADDRESS" --runtime-env "$runtime_env")
if [[ -n ${SUBMISSION_ID:-} ]]; then
    submit+=(--submission-id "$SUBMISSION_ID")
fi
"${submit[@]}" -- "${entrypoint[@]}" --config "$config" "$@"
