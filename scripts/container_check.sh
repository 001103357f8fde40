#!/usr/bin/env bash
# Build the container image (Containerfile), run it on the tiny test model and check its answers: /health
# within 120 s of `run`, the image's own HEALTHCHECK, one request each with text, an image, audio and a
# video, and a spoken answer (a WAV). Then stop it and remove everything it built: the container and its
# volume, the image, and the base image when this script built or pulled it: the disk is left as it was
# (unless WHEEL_CACHE names a folder to keep wheels in).
#
#   CONTAINER=podman|docker  the engine (default: podman if installed, else docker if its daemon answers,
#                            else podman, installed with apt-get when running as root)
#   WHEEL_CACHE=DIR          keep the wheels the image installs there (3.1 GB) for the next podman build
#                            (podman build -v), which then downloads none; default none
#
# When the Containerfile's base image (FROM) is neither here nor pullable (no registry reachable), it is
# built from Debian's package archive with mmdebstrap and imported under that name, trusting this
# machine's CA bundle (SSL_CERT_FILE): the Containerfile stays as it is anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_install() {
  as_root || { echo "container_check: $* missing (install it, or run as root with apt-get)" >&2; exit 1; }
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@") >/dev/null
}

engine="${CONTAINER:-}"
if [ -z "$engine" ]; then
  if command -v podman >/dev/null 2>&1; then
    engine=podman
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    engine=docker
  else
    engine=podman
  fi
fi
if [ "$engine" = podman ] && ! command -v podman >/dev/null 2>&1; then
  apt_install podman runc
fi

tag="check-$$"
image="localhost/qwen-omni-server:$tag"
name="qwen-omni-check-$$"
base="$(sed -n 's/^FROM[[:space:]]\+\([^[:space:]]\+\).*/\1/p' Containerfile | head -n 1)"
case "$base" in
  */*) qualified="$base" ;;
  *) qualified="docker.io/library/$base" ;;
esac
remove_base=0
failed=1
work="$(mktemp -d)"
cleanup() {
  local status=$?
  set +e
  if [ "$failed" = 1 ] && "$engine" container inspect "$name" >/dev/null 2>&1; then
    echo "container_check: the container's last log lines:" >&2
    "$engine" logs "$name" 2>&1 | tail -n 40 >&2
  fi
  "$engine" rm -f -v "$name" >/dev/null 2>&1
  "$engine" rmi -f "$image" >/dev/null 2>&1
  if [ "$remove_base" = 1 ]; then
    "$engine" rmi -f "$qualified" >/dev/null 2>&1
  fi
  if [ "$engine" = docker ]; then
    docker builder prune -f >/dev/null 2>&1
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

if [ "$engine" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
  # What podman needs on machines without systemd (crun may not run there; runc does) and with a lower
  # file limit than its defaults ask for. Set CONTAINERS_CONF to use a configuration of your own.
  nofile="$(ulimit -Hn)"
  [ "$nofile" = unlimited ] && nofile=1048576
  nproc="$(ulimit -Hu)"
  { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
  {
    echo '[containers]'
    echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
    echo '[engine]'
    echo 'cgroup_manager = "cgroupfs"'
    if command -v runc >/dev/null 2>&1; then echo 'runtime = "runc"'; fi
  } >"$work/containers.conf"
  export CONTAINERS_CONF="$work/containers.conf"
fi

seconds() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(seconds)"; }

# The base image: here already, pulled, or built from Debian's archive.
if ! "$engine" image inspect "$qualified" >/dev/null 2>&1; then
  remove_base=1
  if timeout 300 "$engine" pull -q "$qualified" >/dev/null 2>&1; then
    echo "container_check: pulled $qualified"
  else
    suite="${base#*:}"
    suite="${suite%-slim}"
    case "$base" in
      debian:* | */debian:*) ;;
      *) echo "container_check: cannot pull $qualified, and only a Debian base can be built here" >&2; exit 1 ;;
    esac
    command -v mmdebstrap >/dev/null 2>&1 || apt_install mmdebstrap
    started="$(seconds)"
    ca="${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}"
    hook=":"
    change=()
    if [ -f "$ca" ]; then  # a TLS-intercepting proxy's CA is in this bundle: pip in the build needs it
      cp "$ca" "$work/host-ca.crt"
      hook="mkdir -p \"\$1/usr/local/share/ca-certificates\" && cp $work/host-ca.crt \"\$1/usr/local/share/ca-certificates/\""
      change=(--change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
    fi
    # shellcheck disable=SC2086 # DEBIAN_MIRROR: none (mmdebstrap's default) or one mirror URL
    mmdebstrap --quiet --variant=minbase --dpkgopt=force-unsafe-io --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --customize-hook="$hook" "$suite" "$work/rootfs.tar" ${DEBIAN_MIRROR:-} >"$work/mmdebstrap.log" 2>&1 ||
      { tail -n 20 "$work/mmdebstrap.log" >&2; exit 1; }
    "$engine" import "${change[@]}" --change 'CMD ["bash"]' "$work/rootfs.tar" "$qualified" >/dev/null 2>&1
    rm -f "$work/rootfs.tar"
    echo "container_check: built $qualified from Debian's archive in $(since "$started") s"
  fi
fi

# The image. Podman builds get the wheels of the last run (podman build -v), so a rerun downloads none.
wheels="${WHEEL_CACHE:-none}"
build=("$engine" build -f Containerfile -t "$image")
if [ "$engine" = podman ]; then
  build+=(--format docker --layers=false --force-rm)  # docker format: OCI images drop the HEALTHCHECK
  if [ "$wheels" != none ] && [ -f "$wheels/requirements_multimodal.txt" ]; then
    build+=(-v "$wheels:/wheels:ro" --build-arg WHEELS=/wheels)
  fi
fi
started="$(seconds)"
"${build[@]}" . >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; exit 1; }
echo "container_check: built the image in $(since "$started") s ($engine; $("$engine" image inspect --format '{{.Size}}' "$image") bytes)"

if [ "$engine" = podman ] && [ "$wheels" != none ] && ! cmp -s requirements_multimodal.txt "$wheels/requirements_multimodal.txt"; then
  rm -rf "$wheels"
  mkdir -p "$wheels"
  "$engine" run --rm --user 0 -v "$wheels:/wheels" -v "$PWD/requirements_multimodal.txt:/tmp/requirements.txt:ro" \
    "$image" pip download --quiet --no-cache-dir --dest /wheels -r /tmp/requirements.txt >"$work/wheels.log" 2>&1 ||
    { tail -n 20 "$work/wheels.log" >&2; exit 1; }
  cp requirements_multimodal.txt "$wheels/"
  echo "container_check: kept the image's wheels in $wheels for the next build"
fi

# The tiny model and the media, made by the image itself (tests/tiny_model.py, tests/make_media.py).
mkdir -p "$work/data"
cat >"$work/data/make.py" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "/tests")
import make_media  # noqa: E402
import tiny_model  # noqa: E402

out = Path("/out")
tiny_model.build(out / "model")
(out / "image.png").write_bytes(make_media.image_bytes())
(out / "audio.wav").write_bytes(make_media.audio_bytes("wav"))
(out / "video.mp4").write_bytes(make_media.video_bytes(seconds=2.0, audio=True))
EOF
"$engine" run --rm --user 0 -v "$PWD/tests:/tests:ro" -v "$work/data:/out" "$image" \
  sh -c 'python3 /out/make.py && chmod -R a+rX /out' >"$work/make.log" 2>&1 || { tail -n 20 "$work/make.log" >&2; exit 1; }

# Run it as a user would: settings from the environment, the model mounted read-only, a published port.
started="$(seconds)"
"$engine" run -d --name "$name" -p 127.0.0.1::8000 -v "$work/data/model:/model:ro" \
  -e MODEL_PATH=/model -e ENABLE_AUDIO_OUTPUT=true -e HF_HUB_OFFLINE=1 "$image" >"$work/run.log" 2>&1 ||
  { cat "$work/run.log" >&2; exit 1; }
url="http://$("$engine" port "$name" 8000 | head -n 1)"
health=""
while [ "$(since "$started" | cut -d. -f1)" -lt 120 ]; do
  health="$(curl -s -w ' %{http_code}' "$url/health" || true)"
  case "$health" in *' 200') break ;; esac
  if [ "$("$engine" container inspect --format '{{.State.Running}}' "$name")" != true ]; then
    echo "container_check: the container stopped before it was healthy" >&2
    exit 1
  fi
  sleep 1
done
case "$health" in
  '{"status":"ok"'*' 200') echo "container_check: /health ok $(since "$started") s after run" ;;
  *) echo "container_check: not healthy within 120 s of run: ${health:-no answer}" >&2; exit 1 ;;
esac
if [ "$engine" = podman ]; then
  "$engine" healthcheck run "$name" >/dev/null 2>&1 || { echo "container_check: the HEALTHCHECK failed" >&2; exit 1; }
else
  until [ "$(docker inspect --format '{{.State.Health.Status}}' "$name")" = healthy ]; do
    if [ "$(since "$started" | cut -d. -f1)" -ge 120 ]; then
      echo "container_check: docker does not report the container healthy within 120 s" >&2
      exit 1
    fi
    sleep 2
  done
fi
echo "container_check: the HEALTHCHECK passes"
user="$("$engine" exec "$name" id -u)"
[ "$user" != 0 ] || { echo "container_check: the server runs as root" >&2; exit 1; }

# One request of each media kind; each answer must be non-empty text that counts the file it was sent.
ask() {  # ask KIND [curl -F arguments...]
  local kind="$1"
  shift
  curl -s -o "$work/$kind.json" -w '%{http_code}' "$url/multimodal" -F text='What is this?' -F max_new_tokens=8 "$@" \
    >"$work/$kind.code"
  python3 - "$kind" "$(cat "$work/$kind.code")" "$work/$kind.json" <<'EOF'
import json
import sys

kind, code, path = sys.argv[1], sys.argv[2], sys.argv[3]
body = open(path, encoding="utf-8", errors="replace").read()
assert code == "200", f"{kind}: HTTP {code}: {body[:300]}"
answer = json.loads(body)
assert isinstance(answer["text"], str) and answer["text"].strip(), f"{kind}: empty text: {body[:300]}"
assert answer["usage"]["completion_tokens"] >= 1, f"{kind}: no tokens: {body[:300]}"
if kind != "text":
    items = answer["inputs"][kind + "s"]
    assert len(items) == 1 and items[0]["tokens"] > 0, f"{kind}: the {kind} is not in the prompt: {body[:300]}"
print(f"container_check: {kind}: 200, {answer['usage']['prompt_tokens']} prompt tokens, text {answer['text']!r}")
EOF
}
ask text
ask image -F images=@"$work/data/image.png"
ask audio -F audios=@"$work/data/audio.wav"
ask video -F videos=@"$work/data/video.mp4"

# A spoken answer as a WAV. The tiny talker is silent for some seeds (the answer is then JSON): the first of
# seeds 1, 2 and 0 that speaks must give a WAV with samples in it.
for seed in 1 2 0; do
  code="$(curl -s -o "$work/speech.wav" -D "$work/speech.headers" -w '%{http_code}' "$url/multimodal" \
    -F text='Say hello.' -F max_new_tokens=8 -F return_audio=true -F response_format=wav -F seed="$seed")"
  grep -qi '^content-type: application/json' "$work/speech.headers" || break
done
python3 - "$code" "$work/speech.wav" "$work/speech.headers" "$seed" <<'EOF'
import sys
import wave

code, path, headers, seed = sys.argv[1], sys.argv[2], open(sys.argv[3]).read().lower(), sys.argv[4]
assert code == "200", f"speech: HTTP {code}: {open(path, 'rb').read(300)!r}"
assert "content-type: audio/wav" in headers, f"speech: no WAV for seeds 1, 2, 0: {open(path, 'rb').read(300)!r}"
assert "\nx-text: " in headers, f"speech: no X-Text header: {headers}"
with wave.open(path) as sound:
    frames, rate = sound.getnframes(), sound.getframerate()
assert frames > 0, "speech: the WAV holds no samples"
print(f"container_check: speech: 200, a WAV of {frames / rate:.2f} s at {rate} Hz (seed {seed})")
EOF

started="$(seconds)"
"$engine" stop -t 30 "$name" >/dev/null 2>&1
exit_code="$("$engine" container inspect --format '{{.State.ExitCode}}' "$name")"
[ "$exit_code" = 0 ] || { echo "container_check: the server exited with $exit_code when stopped" >&2; exit 1; }
echo "container_check: stopped in $(since "$started") s; removing what it built"
failed=0
