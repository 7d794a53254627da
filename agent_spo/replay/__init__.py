"""Episode replay: list and inspect logged episodes, re-run one, write a static page."""
