"""Deep models trained with PyTorch Lightning, in layers (scvi-tools' shape):

* :mod:`.modules`: the math as ``nn.Module``\\ s: an MLP classifier and a variational
  autoencoder with a negative-binomial likelihood on counts. No device code inside.
* :mod:`.plans`: LightningModules holding the training logic, with typed hyperparameters.
* :mod:`.data`: the fast data path (batches cut from a CSR matrix by row index in bulk, on the
  accelerator when the matrix fits) and the LightningDataModule that makes the seeded splits.
* :mod:`.training`: the Trainer as the pipeline wants it (early stopping, best checkpoint, live
  MLflow logger into the stage's own run, no progress bars) and the fit that returns the best model.
* :mod:`.estimator`: the MLP as a scikit-learn classifier, so the classify stage's folds,
  metrics, comparison and model logging apply to it unchanged.
* :mod:`.embedding`: the VAE job: train, encode, cluster and plot the learned embedding.
* :mod:`.devices`: how many devices a setting names (torch-free: the Snakefile asks it too).

torch and Lightning are imported only here, so the other stages never pay for them.
"""
