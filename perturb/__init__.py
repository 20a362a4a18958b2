"""perturb: degrade one modality of a multimodal sample, to make modality-biased negatives.

    import perturb
    blind = perturb.apply("image.drop", sample)                        # language-bias negative
    noisy = perturb.apply("image.diffusion(t=500)", sample, seed=3)    # image kept but destroyed
    vague = perturb.apply("text.drop_question", sample)                # vision-bias negative
    perturb.parse("image.blur(radius=4)+image.patch_mask(ratio=0.5)")  # [(name, args), ...]
    perturb.OPS                                                        # name -> Op (args, defaults, doc)

Independent of napo and of any model: numpy, PIL and (for pitch/tempo) librosa only.
"""

from perturb.spec import OPS, Arg, Op, apply, parse

__all__ = ["OPS", "Arg", "Op", "apply", "parse"]
