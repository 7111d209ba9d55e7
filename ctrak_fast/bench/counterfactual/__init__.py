"""`ctrak bench counterfactual`: attribution judged by retraining (LDS, remove-and-retrain)."""
