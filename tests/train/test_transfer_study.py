"""The transfer study's verdicts on the published claims, from its summary rows."""

from cxr_jax.train import transfer_study


def row(method, network, budget, auroc):
  return {'method': method, 'network': network, 'budget': budget, 'draws': 3,
          'auroc_mean': auroc, 'auroc_min': auroc, 'auroc_max': auroc}


def test_claims_compare_the_right_methods_at_each_budget():
  summary = [row('linear_probe', 'cxr', '10', 0.80), row('linear_probe', 'generic', '10', 0.70),
             row('linear_probe', 'cxr', '100', 0.85), row('linear_probe', 'generic', '100', 0.90),
             row('finetune', 'cxr', '10', 0.75), row('finetune', 'scratch', '10', 0.60),
             row('lpft', 'cxr', '10', 0.70)]
  values = transfer_study.claim_values(summary, ['10', '100'])
  assert values['cxr_beats_generic_linear_probe'] == {'10': (0.80, 0.70), '100': (0.85, 0.90)}
  assert values['pretraining_beats_scratch'] == {'10': (0.75, 0.60)}
  assert values['lpft_at_least_finetune'] == {'10': (0.70, 0.75)}
  lines = transfer_study.claims(summary, ['10', '100'])
  assert 'holds at 1 of 2 budgets (10 labels: 0.800 vs 0.700; 100 labels: 0.850 vs 0.900)' in lines[0]
  assert 'holds at every budget' in lines[1]
  assert 'does not hold' in lines[2]
  assert 'not measured' in transfer_study.claims([], ['10'])[0]
