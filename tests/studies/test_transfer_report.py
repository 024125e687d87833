"""The transfer study's report: its verdicts on the published claims, in-site and external
scores side by side, and label-efficiency factors, from summary rows."""

import numpy as np
import pytest

from cxr_jax.studies import transfer_report


def row(method, network, budget, auroc, test_set=None):
  out = {'method': method, 'network': network, 'budget': budget, 'draws': 3,
         'auroc_mean': auroc, 'auroc_min': auroc, 'auroc_max': auroc}
  if test_set:
    out['test_set'] = test_set
  return out


def test_claims_compare_the_right_methods_at_each_budget():
  summary = [row('linear_probe', 'cxr', '10', 0.80), row('linear_probe', 'generic', '10', 0.70),
             row('linear_probe', 'cxr', '100', 0.85), row('linear_probe', 'generic', '100', 0.90),
             row('finetune', 'cxr', '10', 0.75), row('finetune', 'scratch', '10', 0.60),
             row('lpft', 'cxr', '10', 0.70), row('linear_probe', 'pixels', '100', 0.84),
             row('finetune', 'cxr', '100', 0.83)]
  values = transfer_report.claim_values(summary, ['10', '100'])
  assert values['cxr_beats_generic_linear_probe'] == {'10': (0.80, 0.70), '100': (0.85, 0.90)}
  assert values['cxr_beats_pixels_linear_probe'] == {'100': (0.85, 0.84)}
  assert values['pretraining_beats_scratch'] == {'10': (0.75, 0.60)}
  assert values['finetune_beats_pixels'] == {'100': (0.83, 0.84)}
  assert values['lpft_at_least_finetune'] == {'10': (0.70, 0.75)}
  lines = transfer_report.claims(summary, ['10', '100'])
  assert 'holds at 1 of 2 budgets (10 labels: 0.800 vs 0.700; 100 labels: 0.850 vs 0.900)' in lines[0]
  assert 'holds at every budget (100 labels: 0.850 vs 0.840)' in lines[1]
  assert 'holds at every budget' in lines[2]
  assert 'does not hold (100 labels: 0.830 vs 0.840)' in lines[3]
  assert 'does not hold' in lines[4]
  assert 'not measured' in transfer_report.claims([], ['10'])[0]
  # External rows never enter the in-site verdicts, and have verdicts of their own.
  summary += [row('linear_probe', 'cxr', '10', 0.55, 'site_c'),
              row('linear_probe', 'generic', '10', 0.65, 'site_c')]
  assert transfer_report.claim_values(summary, ['10']) == transfer_report.claim_values(
      summary[:-2], ['10'])
  external = transfer_report.claim_values(summary, ['10'], test_set='site_c')
  assert external['cxr_beats_generic_linear_probe'] == {'10': (0.55, 0.65)}
  assert external['pretraining_beats_scratch'] == {}
  # The network the claims are about is a setting (e.g. 'supcon' in a comparison).
  renamed = [dict(r, network='supcon' if r['network'] == 'cxr' else r['network'])
             for r in summary]
  assert transfer_report.claim_values(renamed, ['10'], cxr='supcon') == (
      transfer_report.claim_values(summary, ['10']))


def test_side_by_side_pairs_each_method_with_its_external_scores():
  summary = [row('linear_probe', 'cxr', '10', 0.80, 'in_site'),
             row('linear_probe', 'cxr', '10', 0.70, 'site_c'),
             row('mlp_probe', 'cxr', '10', 0.75, 'in_site'),
             row('linear_probe', 'cxr', '45', 0.90, 'in_site'),
             row('linear_probe', 'cxr', '45', float('nan'), 'site_c')]
  table = transfer_report.side_by_side(summary, ['site_c'])
  assert [(r['method'], r['budget']) for r in table] == [
      ('linear_probe', '10'), ('linear_probe', '45'), ('mlp_probe', '10')]
  assert table[0]['in_site'] == 0.80 and table[0]['site_c'] == 0.70
  assert table[0]['change_site_c'] == pytest.approx(-0.10)
  assert np.isnan(table[1]['change_site_c'])
  assert table[2]['site_c'] is None and table[2]['change_site_c'] is None


def test_labels_to_reach_interpolates_in_log_budget():
  curve = {10: 0.60, 45: 0.70, 100: 0.80, 500: 0.90}
  assert transfer_report.labels_to_reach(curve, 0.55) == 10
  assert transfer_report.labels_to_reach(curve, 0.70) == pytest.approx(45)
  assert transfer_report.labels_to_reach(curve, 0.85) == pytest.approx(np.sqrt(100 * 500))
  assert transfer_report.labels_to_reach(curve, 0.95) is None
  # A curve that dips: the first crossing counts.
  assert transfer_report.labels_to_reach({10: 0.7, 45: 0.6, 100: 0.75}, 0.7) == 10


def test_label_efficiency_against_each_baseline():
  summary = [row('linear_probe', 'cxr', '45', 0.80), row('linear_probe', 'cxr', '500', 0.85),
             row('linear_probe', 'generic', '45', 0.60), row('linear_probe', 'generic', '500', 0.70),
             row('linear_probe', 'pixels', '45', 0.70), row('linear_probe', 'pixels', '100', 0.80),
             row('linear_probe', 'pixels', 'all', 0.95), row('finetune', 'cxr', '45', 0.99)]
  values = transfer_report.label_efficiency(summary, 45)
  assert values['generic'] == {'target': 0.80, 'labels': None, 'factor': 500 / 45,
                               'at_least': True}
  assert values['pixels']['labels'] == pytest.approx(100)
  assert values['pixels']['factor'] == pytest.approx(100 / 45)
  lines = transfer_report.efficiency_lines(values, 45)
  assert '**>= 11x**' in lines[0] and '**2.2x**' in lines[1]
  assert transfer_report.label_efficiency(summary, 10) == {}
  assert 'not measured' in transfer_report.efficiency_lines({}, 10)[0]
