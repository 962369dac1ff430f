"""MMCoA's multimodal evaluation attack for zero-shot classification.

Zhou, Bai, Zhao, Chen, "Revisiting the Adversarial Robustness of Vision Language Models: a
Multimodal Perspective" (arXiv 2404.19287), evaluation mode "both1" of ``test.py``
(research/defenses.md §5): the images are attacked with PGD against the *clean* class
prompts (L∞, ε = 1/255, 100 iterations, step 1/255), the class prompts are attacked once with
BERT-Attack (1 word, untargeted KL shift of the prompt embedding), and the adversarial images
are then classified against the adversarial prompts. The two attacks are independent and
composed. Both components are registered attacks named in the parameters, so the result
records exactly which image and text attacks made the number.

The image stage leaves the images the model already misclassifies against the clean prompts
unattacked (the ``pgd`` cells' rule), so with the ``pgd`` cell's parameters it is the
``pgd`` cell's attack on the same images, and the evaluator reuses that cell's adversarial
images instead of computing them again. The reference attacks those images too; here they
keep their clean pixels, and count as correct only if the adversarial prompts happen to
classify them right.
"""

from dataclasses import dataclass, field

from vlbench.api import MultimodalAttack, attacks
from vlbench.evaluation.components import build_component


@attacks.register("mmcoa-attack")
class MMCoAAttack(MultimodalAttack):
    """Image PGD against clean prompts, then classification against BERT-attacked prompts."""

    paper = "Zhou et al., arXiv 2404.19287 (MMCoA), evaluation 'both1'"
    description = "image PGD vs clean prompts + BERT-Attack on the class prompts, composed"
    version = "1"
    tasks = ("classification",)

    @dataclass
    class Params:
        image_attack: str = "pgd"
        image_params: dict = field(default_factory=lambda: {"eps": 1.0, "steps": 100, "step_size": 1.0})
        text_attack: str = "bert-attack"
        text_params: dict = field(default_factory=lambda: {"budget": 1})

    def validate(self) -> None:
        owner = f"attack {self.name}"
        self.image = build_component(owner, self.params.image_attack, self.params.image_params, "image")
        self.text = build_component(owner, self.params.text_attack, self.params.text_params, "text")

    def prepare(self) -> None:
        self.image.prepare()
        self.text.prepare()

    def pending(self):
        return self.image.pending() + self.text.pending()

    def work(self, task, images, texts, classes):
        image, text = self.image.work(task, images, 0, classes), self.text.work(task, 0, texts, classes)
        return None if image is None or text is None else image + text

    def config(self) -> dict:
        return {**super().config(), "components": [self.image.config(), self.text.config()]}

    def threat_model(self) -> dict:
        return {"modality": "multimodal", "image": self.image.threat_model(), "text": self.text.threat_model()}

    def attack_texts(self, problem, generator):
        return problem.perturb_texts(self.text, problem.embedding_shift_objective(), generator)

    def attack_images(self, problem, rows, images, text_embeddings, generator):
        objective = problem.image_objective(rows, problem.clean_text_embeddings)
        return problem.perturb_images(self.image, images, objective, generator)
