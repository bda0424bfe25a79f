"""Tools around a trained model: evaluate, predict, export, the Hub folder, plots and cross-validation."""
