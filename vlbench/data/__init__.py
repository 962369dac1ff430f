"""The datasets: the card and its loading (`datasets`), the loaders of the real on-disk formats (`formats`)."""
