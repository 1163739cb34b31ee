"""Session recommenders: baselines, session-kNN family, neural sequence models and their hybrid."""
