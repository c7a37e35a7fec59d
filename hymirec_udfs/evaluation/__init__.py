"""Stage ``evaluate``: exact full-catalog scoring, ranking metrics, offline evaluation of
trained models and the HTML report.
"""
