"""The models under attack: the model card (`card`) and the release formats its entries are
published in (`formats`), where their weights are and fetching them (`weights`, `fetch`), the
one factory that builds any entry (`factory`), the `Victim` wrapper that takes pixels in
[0, 1] (`victim`), the precision policy (`precision`), and open_clip architecture configs of
vlbench's own models (`configs/`)."""
