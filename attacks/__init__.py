"""vlbench's built-in attacks: one module per attack (torchattacks' layout), found by name and
imported only when used. Modules whose names start with an underscore are helpers shared by
the attacks beside them (``_text_then_image``: Co-Attack and SGA's base; ``_mlm``:
BERT-Attack's masked language model), not attacks."""
