# Sourced by the train_*.sh presets: data flags from the environment, then scripts/launch.sh.
#   FEATURES_PATH  pre-extracted latents (webdataset shards or fast-DiT .npy folder), preferred
#   DATA_PATH      image folder, encoded with the VAE on the fly when FEATURES_PATH is unset
#   VAE_PATH       local diffusers AutoencoderKL folder (sd-vae-ft-mse or -ema); required
#   IMAGE_SIZE     pixels (default 256); RESULTS_DIR (default results/<script name>)
train_preset() {
    local data
    if [ -n "${FEATURES_PATH:-}" ]; then
        data=(--features-path "$FEATURES_PATH")  # shards or a fast-DiT .npy folder: the trainer tells them apart
    elif [ -n "${DATA_PATH:-}" ]; then
        data=(--data-path "$DATA_PATH")
    else
        echo "error: set FEATURES_PATH (latent shards from scripts/extract_features.sh) or DATA_PATH (an image folder)." >&2
        exit 2
    fi
    if [ -z "${VAE_PATH:-}" ]; then
        echo "error: set VAE_PATH to a local diffusers AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-mse downloaded once." >&2
        exit 2
    fi
    local name
    name="$(basename "$0" .sh)"
    bash "$(dirname "${BASH_SOURCE[0]}")/launch.sh" "${data[@]}" --vae-path "$VAE_PATH" \
        --image-size "${IMAGE_SIZE:-256}" --results-dir "${RESULTS_DIR:-results/$name}" \
        --resume auto --ckpt-every 10000 --log-every 100 "$@"
}
