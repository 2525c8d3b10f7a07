import torch, time, sys, math
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
V=int(sys.argv[1]) if len(sys.argv)>1 else 512
import os; L=int(os.environ.get("L","128")); B=int(os.environ.get("B","32")); steps=int(sys.argv[2]) if len(sys.argv)>2 else 1500
layers=int(sys.argv[3]) if len(sys.argv)>3 else 2
lr=float(sys.argv[4]) if len(sys.argv)>4 else 1e-3
attn=sys.argv[5] if len(sys.argv)>5 else "sdpa"
cfg=LlamaConfig(vocab_size=V,hidden_size=128,intermediate_size=352,num_hidden_layers=layers,num_attention_heads=4,num_key_value_heads=4,max_position_embeddings=1024,tie_word_embeddings=False,attn_implementation=attn)
m=LlamaForCausalLM(cfg)
opt=torch.optim.AdamW(m.parameters(),lr=lr,betas=(0.9,0.95),weight_decay=0.0)
g=torch.Generator().manual_seed(1)
def batch():
    ids=torch.randint(0,V,(B,L),generator=g)
    # variable-length span of random tokens then repeated: span length k in [L/4, L/2]
    mask=torch.zeros(B,L,dtype=torch.bool)
    for b in range(B):
        k=int(torch.randint(L//8,L//2,(1,),generator=g))
        s=int(torch.randint(0,L-2*k+1,(1,),generator=g))
        gap=int(torch.randint(0,L-2*k-s+1,(1,),generator=g))
        t=s+k+gap
        ids[b,t:t+k]=ids[b,s:s+k]
        mask[b,t+1:t+k]=True
    return ids,mask
t0=time.time()
for step in range(steps+1):
    ids,mask=batch()
    lg=m(input_ids=ids).logits
    nll=F.cross_entropy(lg[:,:-1].reshape(-1,V),ids[:,1:].reshape(-1),reduction='none').view(B,L-1)
    loss=nll.mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(),1.0); opt.step()
    if step%100==0:
        cm=mask[:,1:]
        print(step, f"{time.time()-t0:.0f}s loss {loss.item():.3f} copy {nll[cm].mean().item():.3f} noncopy {nll[~cm].mean().item():.3f} logV {math.log(V):.2f}",flush=True)
