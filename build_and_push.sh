#!/usr/bin/env bash
# Build the images with docker buildx and push them to Docker Hub (or any registry):
#
#   ./build_and_push.sh <user> <tag> [--platform linux/amd64] [--no-push] [--cpu] [--dry-run]
#
#   <user>/<name>:<tag>          vLLM (Dockerfile, target vllm)
#   <user>/<name>:<tag>-runpod   the same, running as root for RunPod's root-owned volumes
#   <user>/<name>:<tag>-trtllm   TensorRT-LLM (Dockerfile.trtllm)
#   <user>/<name>:<tag>-trtllm-runpod   the same, running as root (RunPod)
#   <user>/<name>:<tag>-cpu      with --cpu: the CPU image (Dockerfile, target cpu)
#
# --no-push loads the images into the local Docker instead (one platform only). --dry-run prints the
# commands and stops. Environment: IMAGE_NAME (default vllm-inference-api), VLLM_VERSION,
# VLLM_CUDA_VARIANT (-cu129: vLLM's CUDA 12.9 build) and TRTLLM_VERSION (build arguments; default:
# the Dockerfiles'). Runs under bash 3.2 (macOS's /bin/bash) and newer.
set -Eeuo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")"

usage() {
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

die() {
  echo "build_and_push.sh: $*" >&2
  exit 1
}

positional=()
platform=""
push=1
cpu=0
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --platform)
      [[ $# -ge 2 ]] || usage
      platform="$2"
      shift 2
      ;;
    --platform=*) platform="${1#*=}"; shift ;;
    --no-push) push=0; shift ;;
    --cpu) cpu=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage ;;
    -*) echo "build_and_push.sh: unknown option $1" >&2; usage ;;
    *) positional+=("$1"); shift ;;
  esac
done
[[ ${#positional[@]} -eq 2 ]] || usage
user="${positional[0]}"
tag="${positional[1]}"
name="${IMAGE_NAME:-vllm-inference-api}"
[[ "$user" =~ ^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$ ]] || die "'$user' is not a registry user or namespace"
[[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,120}$ ]] || die "'$tag' is not a valid image tag"
if [[ $push -eq 0 && "$platform" == *,* ]]; then
  die "--no-push loads into the local Docker, which takes one platform, not '$platform'"
fi

common=(docker buildx build)
[[ -n "$platform" ]] && common+=(--platform "$platform")
if [[ $push -eq 1 ]]; then common+=(--push); else common+=(--load); fi

builds=()
plan() { builds+=("$(printf '%q ' "$@")"); }
# Before bash 4.4, "${a[@]}" of an empty array is an unbound variable under `set -u` (macOS's bash
# is 3.2): possibly empty arrays are expanded as ${a[@]+"${a[@]}"}.
vllm_args=()
[[ -n "${VLLM_VERSION:-}" ]] && vllm_args+=(--build-arg "VLLM_VERSION=${VLLM_VERSION}")
[[ -n "${VLLM_CUDA_VARIANT:-}" ]] && vllm_args+=(--build-arg "VLLM_CUDA_VARIANT=${VLLM_CUDA_VARIANT}")
trt_args=()
[[ -n "${TRTLLM_VERSION:-}" ]] && trt_args+=(--build-arg "TRTLLM_VERSION=${TRTLLM_VERSION}")

plan "${common[@]}" ${vllm_args[@]+"${vllm_args[@]}"} -f Dockerfile --target vllm -t "${user}/${name}:${tag}" .
plan "${common[@]}" ${vllm_args[@]+"${vllm_args[@]}"} -f Dockerfile --target runpod -t "${user}/${name}:${tag}-runpod" .
plan "${common[@]}" ${trt_args[@]+"${trt_args[@]}"} -f Dockerfile.trtllm --target trtllm -t "${user}/${name}:${tag}-trtllm" .
plan "${common[@]}" ${trt_args[@]+"${trt_args[@]}"} -f Dockerfile.trtllm --target runpod -t "${user}/${name}:${tag}-trtllm-runpod" .
if [[ $cpu -eq 1 ]]; then
  plan "${common[@]}" -f Dockerfile --target cpu -t "${user}/${name}:${tag}-cpu" .
fi

echo "build_and_push.sh will run, from $(pwd):"
for cmd in "${builds[@]}"; do echo "  ${cmd% }"; done
[[ $dry_run -eq 1 ]] && exit 0

command -v docker >/dev/null || die "docker is not installed (https://docs.docker.com/engine/install/)"
docker buildx version >/dev/null 2>&1 || die "docker buildx is not available (install the buildx plugin)"
docker info >/dev/null 2>&1 || die "cannot reach the Docker daemon (is it running? may this user use it?)"

for cmd in "${builds[@]}"; do
  echo "+ ${cmd% }"
  eval "$cmd"
done
if [[ $push -eq 1 ]]; then
  echo "pushed: ${user}/${name}:${tag} ${user}/${name}:${tag}-runpod ${user}/${name}:${tag}-trtllm ${user}/${name}:${tag}-trtllm-runpod$([[ $cpu -eq 1 ]] && echo " ${user}/${name}:${tag}-cpu")"
fi
