"""The references on real data: the raw-pixel linear probe and BM3D beside blur and median.

    python experiments/baselines_check.py [--images=500] [--levels=0.1,0.3,0.5] [--no-clip]
                                          [--skip_probe] [--json=FILE]

Loads Fashion-MNIST (as ``dae-jax train`` does), fits ``baselines.linear_probe`` on raw
pixels (published: 0.842, Xiao et al. 2017) and scores ``baselines.best_classical`` at
each Gaussian sigma on the sweep's kind of noisy test set (clipped to [0, 1] unless
``--no-clip``). BM3D is scored on the first ``--images`` test images; blur and median are
shown on the same images and on the whole test set. Prints a markdown table.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import ml_collections

from dae_jax import baselines, corruption, data, metrics, runfiles, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=baselines.BM3D_IMAGES)
    parser.add_argument("--levels", default="0.1,0.3,0.5")
    parser.add_argument("--no-clip", dest="clip", action="store_false")
    parser.add_argument("--skip_probe", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    config = ml_collections.ConfigDict(
        {"name": "fashion_mnist", "local_dir": "", "tfds_dir": "", "train_size": 0, "test_size": 0}
    )
    dataset = data.load(config)
    print(f"{dataset.name} from {dataset.source}; {runfiles.device_info()}")
    out: dict = {"images": args.images, "clip": args.clip, "levels": {}}

    if not args.skip_probe:
        probe = baselines.linear_probe(
            dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels
        )
        again = baselines.linear_probe(
            dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels
        )
        out["probe"] = {**probe, "seconds_compiled": again["seconds"]}
        print(
            f"raw-pixel probe: test {probe['test_accuracy']:.4f}, l2 {probe['l2']:g} "
            f"(held-out {probe['heldout_accuracy']:.4f}; per l2 {probe['heldout_accuracies']}), "
            f"{probe['iterations']} refit iterations (path {probe['path_iterations']}), "
            f"converged {probe['converged']}, {probe['seconds']:.1f} s with compile, "
            f"{again['seconds']:.1f} s compiled"
        )

    clean = step.to_float(jnp.asarray(dataset.test_images))
    key = jax.random.key(10_000)
    print(
        "\n| sigma | noisy (subset) | clip | blur (param) | median (param) | BM3D (sigma_psd) "
        "| BM3D s/image | blur, all 10k | median, all 10k |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, level in enumerate(float(v) for v in args.levels.split(",")):
        noisy = corruption.corrupt(
            "gaussian", jax.random.fold_in(key, i), clean, jnp.float32(level), clip=args.clip
        )[0]
        count = args.images
        started = time.perf_counter()
        subset = baselines.best_classical(
            noisy[:count], clean[:count], noise="gaussian", level=level, clipped=args.clip
        )
        whole = baselines.best_classical(noisy, clean)
        noisy_psnr = float(jnp.mean(metrics.psnr(noisy[:count], clean[:count])))
        bm3d = subset["bm3d"]
        per_image = bm3d["seconds"] / (bm3d["images"] * len(baselines.BM3D_FACTORS[args.clip]))
        out["levels"][level] = {
            "subset": subset,
            "all": whole,
            "seconds": time.perf_counter() - started,
        }
        print(
            f"| {level:g} | {noisy_psnr:.2f} | {subset['clip']['psnr']:.2f} | "
            f"{subset['gaussian_blur']['psnr']:.2f} ({subset['gaussian_blur']['parameter']:g}) | "
            f"{subset['median_filter']['psnr']:.2f} ({subset['median_filter']['parameter']:g}) | "
            f"**{bm3d['psnr']:.2f}** ({bm3d['parameter']:.3g}) | {per_image * 1000:.0f} ms | "
            f"{whole['gaussian_blur']['psnr']:.2f} | {whole['median_filter']['psnr']:.2f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(out, file, indent=1, default=float)


if __name__ == "__main__":
    main()
