"""Clean fine-tuning: the "FT w/o attack" baseline of the TeCoA lineage.

Objective (the TeCoA loss of Mao et al., ICLR 2023, §3, with the perturbation set to zero,
as ``finetuning.py --VPbaseline`` does; research/defenses.md §2):

    L(θ) = E_(x,y) [ CE( s · cos(f_θ(x), w_c)_{c=1..C}, y ) ],
    w_c = normalize( mean_t normalize(g(template_t(c))) ),

where ``f_θ`` is the image encoder being fine-tuned, ``g`` the frozen text encoder, ``s`` the
(frozen) logit scale and ``w_c`` the class-prompt embeddings of the training dataset, computed
once from the base model. Only the image encoder trains. The parameters are TeCoA's, so
``vanilla`` and ``tecoa`` differ by the adversarial examples alone.
"""

from vlbench.api import defenses
from vlbench.training.defenses import ClassPromptParams, TrainingDefense
from vlbench.training.losses import class_prompt_loss


@defenses.register("vanilla")
class VanillaFineTuning(TrainingDefense):
    """Clean fine-tuning of the image encoder on class-prompt cross-entropy."""

    paper = "clean fine-tuning baseline (TeCoA objective with no attack; Mao et al., ICLR 2023)"
    description = "clean fine-tuning of the image encoder against frozen class prompts"
    version = "1"
    trains_parameters = ("visual.",)  # only the image tower trains

    Params = ClassPromptParams

    def fit(self, victim, run) -> dict:
        batches = self.batches(victim, run)

        def loss_at(step: int):
            batch = batches.batch(step)
            return class_prompt_loss(victim.encode_image(batch.images), batch.class_weights, batch.labels,
                                     victim.logit_scale.detach())

        return self.fit_parameters(victim, run, victim.model.visual.parameters(), loss_at, {})
