"""`skinclf report`: paper Table 1, the confusion matrix, training curves and ROC from run folders.

The data flows: run folders (runs) -> groups of repeated runs per dataset (groups) ->
tables (tables) and figures (figures) -> files written by the command (command).
"""
