//+------------------------------------------------------------------+
//| NatronEA.mq5                                                     |
//| Trades Natron's predictions once per newly closed bar, with one  |
//| of two engines (InpEngine):                                      |
//|  ONNX: natron.onnx (the whole candles -> probabilities function, |
//|        made by configs/export.py) runs inside the terminal, live |
//|        and in the Strategy Tester. No server.                    |
//|  HTTP: POST the bars to a Natron server's /predict (WebRequest;  |
//|        not available in the Strategy Tester).                    |
//| See mt5/README.md. The trading rules below (fresh bar, lots,     |
//| stops vs Bid/Ask, freeze level, netting, probability checks) are |
//| mirrored in tests/mt5_client.py and pinned by its tests.         |
//|                                                                  |
//| Time convention (HTTP): the server speaks UTC only. Bar times in |
//| MT5 are broker SERVER time, so the EA subtracts the server's UTC |
//| offset before sending and adds it back to the reply's timestamp  |
//| before comparing it with the bar it asked about. The ONNX model  |
//| reads no clock.                                                  |
//+------------------------------------------------------------------+
#property copyright   "Natron"
#property version     "2.00"
#property description "On every newly closed bar: run natron.onnx in the terminal (ONNX engine) or POST the bars to"
#property description "Natron's /predict (HTTP engine), then open/close this EA's own positions (magic number)."
#property description "Never trades on a stale bar, an unreadable or out-of-range probability, or a failed check."
// The Strategy Tester copies these files from MQL5\Files to its agents (ONNX engine without embedding).
#property tester_file "natron.onnx"
#property tester_file "natron.json"

#include <Trade\Trade.mqh>

// Uncomment to embed natron.onnx (placed next to this .mq5 file) in the compiled EA: no file is needed at run
// time then, in the terminal or in the tester. natron.json's required_candles must then be typed into
// InpRequiredCandles (or natron.json copied to MQL5\Files as well).
// #define NATRON_EMBED_ONNX
#ifdef NATRON_EMBED_ONNX
#resource "natron.onnx" as uchar ExtNatronModel[]
#endif

enum ENUM_NATRON_ENGINE
  {
   NATRON_ENGINE_ONNX = 0,   // ONNX: natron.onnx inside the terminal (live and Strategy Tester)
   NATRON_ENGINE_HTTP = 1    // HTTP: a Natron server's /predict (live only)
  };

//--- inputs
input ENUM_NATRON_ENGINE InpEngine   = NATRON_ENGINE_ONNX; // engine
input string InpOnnxFile         = "natron.onnx";  // ONNX: model file in MQL5\Files (ignored when embedded)
input string InpMetaFile         = "natron.json";  // ONNX: its natron.json in MQL5\Files (shapes, classes, threshold)
input bool   InpCommonFiles      = false;    // ONNX: read both files from the common Files folder
input string InpUrl              = "http://127.0.0.1:8000/predict"; // HTTP: /predict URL (whitelist it: Tools > Options > Expert Advisors)
input string InpApiKey           = "";       // HTTP: API key (sent as X-API-Key); empty when the server has none
input int    InpRequiredCandles  = 0;        // candles per prediction; 0 = natron.json (ONNX) or GET /model_info (HTTP)
input int    InpRetrySeconds     = 30;       // HTTP: retry GET /model_info this often while the server is unreachable
input int    InpTimeoutMs        = 2000;     // HTTP: WebRequest timeout (ms); a timeout means no trade on that bar
input double InpThreshold        = 0.6;      // BUY iff buy_prob >= this and buy_prob > sell_prob (SELL mirrored)
input double InpLots             = 0.10;     // position size (lots), floored to the volume step; refused below the minimum
input int    InpAtrPeriod        = 14;       // ATR period for stop and target
input double InpStopAtr          = 1.5;      // stop loss distance in ATRs of the closed bar (0 = no stop)
input double InpTargetAtr        = 3.0;      // take profit distance in ATRs (0 = no target)
input bool   InpCloseOnOpposite  = true;     // close our position when the opposite signal arrives
input bool   InpCloseOnHold      = false;    // close our positions when the signal is HOLD
input long   InpMagic            = 7092024;  // identifies this EA's positions
input int    InpDeviationPoints  = 20;       // max slippage (points)
input bool   InpUseRealVolume    = false;    // real volume instead of tick volume (use what training used)

//--- state
CTrade   g_trade;
int      g_atr_handle = INVALID_HANDLE;
long     g_onnx = INVALID_HANDLE;
datetime g_bar_open = 0;      // open time of the bar forming at the last check
int      g_required = 0;      // candles per prediction (0: not known yet, HTTP engine retrying)
int      g_num_direction = 3; // class counts of the ONNX outputs (natron.json)
int      g_num_regime = 6;

//+------------------------------------------------------------------+
//| Minimal JSON field extraction.                                   |
//| MQL5 has no JSON library. The server's /predict reply and        |
//| natron.json hold the scalar fields read here once, before any    |
//| nested object that could repeat them ("first occurrence of the   |
//| quoted key followed by a colon"). String values must not contain |
//| escaped quotes (ours never do).                                  |
//+------------------------------------------------------------------+
bool IsJsonSpace(const ushort c)
  {
   return c == ' ' || c == '\t' || c == '\r' || c == '\n';
  }

// Index of the first character of the value of "key", or -1.
int JsonValueStart(const string json, const string key)
  {
   string needle = "\"" + key + "\"";
   int n = StringLen(json);
   int pos = StringFind(json, needle);
   while(pos >= 0)
     {
      int i = pos + StringLen(needle);
      while(i < n && IsJsonSpace(StringGetCharacter(json, i)))
         i++;
      if(i < n && StringGetCharacter(json, i) == ':')
        {
         i++;
         while(i < n && IsJsonSpace(StringGetCharacter(json, i)))
            i++;
         return i < n ? i : -1;
        }
      pos = StringFind(json, needle, pos + 1);   // that was a string value, not a key: keep looking
     }
   return -1;
  }

// The raw text of a scalar value (up to , } ] or a space); false when absent, null or a string.
bool JsonGetToken(const string json, const string key, string &token)
  {
   int i = JsonValueStart(json, key);
   if(i < 0)
      return false;
   int n = StringLen(json);
   int j = i;
   while(j < n)
     {
      ushort c = StringGetCharacter(json, j);
      if(c == ',' || c == '}' || c == ']' || IsJsonSpace(c))
         break;
      j++;
     }
   token = StringSubstr(json, i, j - i);
   return j > i && token != "null" && StringGetCharacter(token, 0) != '"';
  }

bool JsonGetDouble(const string json, const string key, double &value)
  {
   string token;
   if(!JsonGetToken(json, key, token))
      return false;
   value = StringToDouble(token);
   return true;
  }

bool JsonGetLong(const string json, const string key, long &value)
  {
   double d;
   if(!JsonGetDouble(json, key, d))
      return false;
   value = (long)MathRound(d);
   return true;
  }

bool JsonGetString(const string json, const string key, string &value)
  {
   int i = JsonValueStart(json, key);
   if(i < 0 || StringGetCharacter(json, i) != '"')
      return false;
   int j = StringFind(json, "\"", i + 1);
   if(j < 0)
      return false;
   value = StringSubstr(json, i + 1, j - i - 1);
   return true;
  }

// A probability: a plain decimal ([0-9.] only: StringToDouble returns 0 for text it cannot read, which would
// pass for a valid probability; the server never writes exponents) in [0, 1]. Mirror: read_probability.
bool ReadProbability(const string json, const string key, double &value)
  {
   string token;
   if(!JsonGetToken(json, key, token))
      return false;
   int dots = 0;
   for(int i = 0; i < StringLen(token); i++)
     {
      ushort c = StringGetCharacter(token, i);
      if(c == '.')
         dots++;
      else
         if(c < '0' || c > '9')
            return false;
     }
   if(dots > 1)
      return false;
   value = StringToDouble(token);
   return value >= 0.0 && value <= 1.0;
  }

//+------------------------------------------------------------------+
//| Trading rules (mirrored in tests/mt5_client.py)                  |
//+------------------------------------------------------------------+
// IsFreshBar: act only on a bar that closed within one period of the current server time (not on the first
// tick after attaching to a long-closed bar, after a weekend or an outage). Mirror: bar_is_fresh.
bool IsFreshBar(const datetime closed_bar_open)
  {
   long period = PeriodSeconds(_Period);
   long closed_at = (long)closed_bar_open + period;
   long now = (long)TimeCurrent();
   return closed_at <= now && now < closed_at + period;
  }

// NormalizeLots: floor to the volume step (never up), 0 (refuse) below the minimum, capped at the maximum.
double NormalizeLots(const double lots)
  {
   double step = SymbolInfoDouble(_Symbol, SYMBOL_VOLUME_STEP);
   double lo = SymbolInfoDouble(_Symbol, SYMBOL_VOLUME_MIN);
   double hi = SymbolInfoDouble(_Symbol, SYMBOL_VOLUME_MAX);
   double out = lots;
   if(step > 0)
     {
      out = MathFloor(lots / step + 1e-9) * step;
      int decimals = (int)MathMax(0, -MathFloor(MathLog10(step)) + 2);
      out = NormalizeDouble(out, decimals);
     }
   if(out <= 0 || out < lo - 1e-12)
      return 0.0;
   return MathMin(out, hi);
  }

double RoundDown(const double price)
  {
   return NormalizeDouble(MathFloor(price / _Point + 1e-9) * _Point, _Digits);
  }

double RoundUp(const double price)
  {
   return NormalizeDouble(MathCeil(price / _Point - 1e-9) * _Point, _Digits);
  }

// StopPrices: SL/TP at InpStopAtr / InpTargetAtr ATRs from the entry (Ask for a buy, Bid for a sell), then kept
// beyond max(stops level, freeze level) + 1 point from the price the broker checks them against (Bid for a
// buy, Ask for a sell), rounded away from the market. 0 = none. Mirror: stop_prices.
void StopPrices(const bool is_buy, const MqlTick &tick, const double atr, double &sl, double &tp)
  {
   double entry = is_buy ? tick.ask : tick.bid;
   double check = is_buy ? tick.bid : tick.ask;
   long level = MathMax(SymbolInfoInteger(_Symbol, SYMBOL_TRADE_STOPS_LEVEL),
                        SymbolInfoInteger(_Symbol, SYMBOL_TRADE_FREEZE_LEVEL));
   double gap = level > 0 ? (level + 1) * _Point : 0.0;
   sl = 0.0;
   tp = 0.0;
   if(InpStopAtr > 0)
      sl = is_buy ? RoundDown(MathMin(entry - InpStopAtr * atr, check - gap))
                  : RoundUp(MathMax(entry + InpStopAtr * atr, check + gap));
   if(InpTargetAtr > 0)
      tp = is_buy ? RoundUp(MathMax(entry + InpTargetAtr * atr, check + gap))
                  : RoundDown(MathMin(entry - InpTargetAtr * atr, check - gap));
  }

// CanClose: the broker refuses to close or modify a position whose SL or TP lies within the freeze level of
// the price it triggers at (Bid for a long, Ask for a short). Mirror: can_close.
bool CanClose(const bool is_buy, const double sl, const double tp)
  {
   long freeze = SymbolInfoInteger(_Symbol, SYMBOL_TRADE_FREEZE_LEVEL);
   if(freeze <= 0)
      return true;
   MqlTick tick;
   if(!SymbolInfoTick(_Symbol, tick))
      return false;
   double price = is_buy ? tick.bid : tick.ask;
   double d = freeze * _Point;
   return (sl == 0 || MathAbs(price - sl) > d) && (tp == 0 || MathAbs(price - tp) > d);
  }

bool IsNetting()
  {
   return (ENUM_ACCOUNT_MARGIN_MODE)AccountInfoInteger(ACCOUNT_MARGIN_MODE) != ACCOUNT_MARGIN_MODE_RETAIL_HEDGING;
  }

string Decide(const double buy_prob, const double sell_prob)
  {
   if(buy_prob >= InpThreshold && buy_prob > sell_prob)
      return "BUY";
   if(sell_prob >= InpThreshold && sell_prob > buy_prob)
      return "SELL";
   return "HOLD";
  }

//+------------------------------------------------------------------+
//| Positions of this EA (symbol + magic number)                     |
//+------------------------------------------------------------------+
int CountOwn(const ENUM_POSITION_TYPE type)
  {
   int count = 0;
   for(int i = PositionsTotal() - 1; i >= 0; i--)
     {
      ulong ticket = PositionGetTicket(i);
      if(ticket == 0)
         continue;
      if(PositionGetString(POSITION_SYMBOL) == _Symbol && PositionGetInteger(POSITION_MAGIC) == InpMagic &&
         (ENUM_POSITION_TYPE)PositionGetInteger(POSITION_TYPE) == type)
         count++;
     }
   return count;
  }

// Positions on this symbol that are not this EA's (another EA's or manual ones).
int CountForeign()
  {
   int count = 0;
   for(int i = PositionsTotal() - 1; i >= 0; i--)
     {
      ulong ticket = PositionGetTicket(i);
      if(ticket != 0 && PositionGetString(POSITION_SYMBOL) == _Symbol && PositionGetInteger(POSITION_MAGIC) != InpMagic)
         count++;
     }
   return count;
  }

void LogResult(const string what, const double lots)
  {
   uint code = g_trade.ResultRetcode();
   if(code == TRADE_RETCODE_DONE || code == TRADE_RETCODE_PLACED)
      return;
   if(code == TRADE_RETCODE_DONE_PARTIAL)
      PrintFormat("Natron: %s partially filled: %.2f of %.2f lots", what, g_trade.ResultVolume(), lots);
   else
      PrintFormat("Natron: %s failed: %u %s", what, code, g_trade.ResultRetcodeDescription());
  }

void CloseOwn(const ENUM_POSITION_TYPE type)
  {
   for(int i = PositionsTotal() - 1; i >= 0; i--)
     {
      ulong ticket = PositionGetTicket(i);
      if(ticket == 0)
         continue;
      if(PositionGetString(POSITION_SYMBOL) != _Symbol || PositionGetInteger(POSITION_MAGIC) != InpMagic ||
         (ENUM_POSITION_TYPE)PositionGetInteger(POSITION_TYPE) != type)
         continue;
      double volume = PositionGetDouble(POSITION_VOLUME);
      if(!CanClose(type == POSITION_TYPE_BUY, PositionGetDouble(POSITION_SL), PositionGetDouble(POSITION_TP)))
        {
         PrintFormat("Natron: position %I64u has SL/TP within the freeze level; it cannot be closed now (next bar)", ticket);
         continue;
        }
      g_trade.PositionClose(ticket, InpDeviationPoints);
      LogResult(StringFormat("closing position %I64u", ticket), volume);
     }
  }

void Open(const bool is_buy, const double atr)
  {
   MqlTick tick;
   if(!SymbolInfoTick(_Symbol, tick))
     {
      Print("Natron: no tick for ", _Symbol, "; not opening");
      return;
     }
   double lots = NormalizeLots(InpLots);
   if(lots <= 0)
     {
      PrintFormat("Natron: %.2f lots floored to the volume step is below the minimum %.2f; not opening", InpLots,
                  SymbolInfoDouble(_Symbol, SYMBOL_VOLUME_MIN));
      return;
     }
   double price = is_buy ? tick.ask : tick.bid;
   double margin = 0;
   if(!OrderCalcMargin(is_buy ? ORDER_TYPE_BUY : ORDER_TYPE_SELL, _Symbol, lots, price, margin) ||
      margin > AccountInfoDouble(ACCOUNT_MARGIN_FREE))
     {
      PrintFormat("Natron: margin %.2f for %.2f lots exceeds the free margin %.2f (or cannot be computed); not opening",
                  margin, lots, AccountInfoDouble(ACCOUNT_MARGIN_FREE));
      return;
     }
   double sl, tp;
   StopPrices(is_buy, tick, atr, sl, tp);
   if(is_buy)
      g_trade.Buy(lots, _Symbol, price, sl, tp, "Natron");
   else
      g_trade.Sell(lots, _Symbol, price, sl, tp, "Natron");
   LogResult(StringFormat("%s %.2f lots", is_buy ? "buy" : "sell", lots), lots);
  }

// PlanActions + execution: closes first, and they never depend on ATR; opening needs ATR only for SL/TP.
// Netting accounts hold one position per symbol: a buy while short would reduce the short instead of
// opening a long, so the short is closed first (InpCloseOnOpposite) or the buy is skipped. Mirror: plan_actions.
void Act(const string decision)
  {
   bool netting = IsNetting();
   if(decision == "BUY" || decision == "SELL")
     {
      bool is_buy = decision == "BUY";
      ENUM_POSITION_TYPE mine = is_buy ? POSITION_TYPE_BUY : POSITION_TYPE_SELL;
      ENUM_POSITION_TYPE theirs = is_buy ? POSITION_TYPE_SELL : POSITION_TYPE_BUY;
      int have_theirs = CountOwn(theirs);
      if(have_theirs > 0 && InpCloseOnOpposite)
         CloseOwn(theirs);
      if(CountOwn(mine) > 0)
         return;
      if(netting && CountForeign() > 0)
        {
         Print("Natron: another position is open on this netting symbol; an order would net against it: not opening");
         return;
        }
      if(netting && CountOwn(theirs) > 0)
        {
         Print("Natron: netting account and our opposite position is still open; not opening (it would only reduce it)");
         return;
        }
      double atr = 0;
      if(InpStopAtr > 0 || InpTargetAtr > 0)
        {
         double buffer[];
         if(CopyBuffer(g_atr_handle, 0, 1, 1, buffer) != 1 || buffer[0] <= 0)
           {
            Print("Natron: ATR of the closed bar is not available; not opening (exits were handled)");
            return;
           }
         atr = buffer[0];
        }
      Open(is_buy, atr);
     }
   else
      if(InpCloseOnHold)
        {
         CloseOwn(POSITION_TYPE_BUY);
         CloseOwn(POSITION_TYPE_SELL);
        }
  }

//+------------------------------------------------------------------+
//| ONNX engine                                                      |
//+------------------------------------------------------------------+
string ReadTextFile(const string name)
  {
   int flags = FILE_READ | FILE_TXT | FILE_ANSI | (InpCommonFiles ? FILE_COMMON : 0);
   int h = FileOpen(name, flags);
   if(h == INVALID_HANDLE)
      return "";
   string text = "";
   while(!FileIsEnding(h))
      text += FileReadString(h) + "\n";
   FileClose(h);
   return text;
  }

bool OnnxInit()
  {
   string meta = ReadTextFile(InpMetaFile);
   long required = InpRequiredCandles, nd = 3, nr = 6, columns = 5;
   if(meta != "")
     {
      string format;
      if(!JsonGetString(meta, "format", format) || format != "natron-export-v1")
        {
         PrintFormat("Natron: %s is not a natron-export-v1 file (format '%s')", InpMetaFile, format);
         return false;
        }
      long from_meta = 0;
      if(!JsonGetLong(meta, "required_candles", from_meta) || !JsonGetLong(meta, "num_direction_classes", nd) ||
         !JsonGetLong(meta, "num_regime_classes", nr) || !JsonGetLong(meta, "num_columns", columns))
        {
         Print("Natron: ", InpMetaFile, " lacks required_candles / class counts; re-run the export phase");
         return false;
        }
      if(required > 0 && required != from_meta)
        {
         PrintFormat("Natron: InpRequiredCandles %I64d differs from natron.json's %I64d", required, from_meta);
         return false;
        }
      required = from_meta;
     }
   if(required <= 0 || columns != 5)
     {
      PrintFormat("Natron: required_candles unknown: copy %s to MQL5\\Files or set InpRequiredCandles", InpMetaFile);
      return false;
     }
#ifdef NATRON_EMBED_ONNX
   g_onnx = OnnxCreateFromBuffer(ExtNatronModel, ONNX_DEFAULT);
#else
   g_onnx = OnnxCreate(InpOnnxFile, ONNX_DEFAULT | (InpCommonFiles ? ONNX_COMMON_FOLDER : 0));
#endif
   if(g_onnx == INVALID_HANDLE)
     {
      PrintFormat("Natron: cannot load the ONNX model %s: error %d", InpOnnxFile, GetLastError());
      return false;
     }
   if(OnnxGetInputCount(g_onnx) != 1 || OnnxGetOutputCount(g_onnx) != 4 || OnnxGetInputName(g_onnx, 0) != "candles" ||
      OnnxGetOutputName(g_onnx, 0) != "buy_prob" || OnnxGetOutputName(g_onnx, 1) != "sell_prob" ||
      OnnxGetOutputName(g_onnx, 2) != "direction_probs" || OnnxGetOutputName(g_onnx, 3) != "regime_probs")
     {
      Print("Natron: the ONNX model's inputs/outputs are not natron.json's (candles -> buy_prob, sell_prob, "
            "direction_probs, regime_probs)");
      return false;
     }
   long in_shape[3], p_shape[1], d_shape[2], r_shape[2];   // filled at run time (no constant initialisers)
   in_shape[0] = 1;
   in_shape[1] = required;
   in_shape[2] = 5;
   p_shape[0] = 1;
   d_shape[0] = 1;
   d_shape[1] = nd;
   r_shape[0] = 1;
   r_shape[1] = nr;
   // OnnxSetInputShape / OnnxSetOutputShape fail when the model's fixed shapes differ: a model exported for
   // another required_candles or class count cannot be run by mistake.
   if(!OnnxSetInputShape(g_onnx, 0, in_shape) || !OnnxSetOutputShape(g_onnx, 0, p_shape) ||
      !OnnxSetOutputShape(g_onnx, 1, p_shape) || !OnnxSetOutputShape(g_onnx, 2, d_shape) ||
      !OnnxSetOutputShape(g_onnx, 3, r_shape))
     {
      PrintFormat("Natron: ONNX shapes differ from natron.json ([1,%I64d,5] -> [1],[1],[1,%I64d],[1,%I64d]): error %d",
                  required, nd, nr, GetLastError());
      return false;
     }
   g_required = (int)required;
   g_num_direction = (int)nd;
   g_num_regime = (int)nr;
   return true;
  }

// OnnxOutputsOk: every probability finite and in [0, 1], each softmax summing to 1. Mirror: onnx_outputs_ok.
bool OnnxOutputsOk(const double buy, const double sell, const vectorf &direction, const vectorf &regime)
  {
   if(!MathIsValidNumber(buy) || !MathIsValidNumber(sell) || buy < 0 || buy > 1 || sell < 0 || sell > 1)
      return false;
   double sd = 0, sr = 0;
   for(ulong i = 0; i < direction.Size(); i++)
     {
      if(!MathIsValidNumber(direction[i]) || direction[i] < 0 || direction[i] > 1)
         return false;
      sd += direction[i];
     }
   for(ulong i = 0; i < regime.Size(); i++)
     {
      if(!MathIsValidNumber(regime[i]) || regime[i] < 0 || regime[i] > 1)
         return false;
      sr += regime[i];
     }
   return MathAbs(sd - 1.0) <= 1e-3 && MathAbs(sr - 1.0) <= 1e-3;
  }

// PointsInput + OnnxRun. The prices go in as MathRound(price / _Point), computed in double: exact integers
// (float32 holds them exactly below 2**24), the input natron.onnx expects (natron.json "input").
bool OnnxPredict(const MqlRates &rates[], const int count, double &buy_prob, double &sell_prob)
  {
   matrixf x(count, 5);
   for(int i = 0; i < count; i++)
     {
      double o = MathRound(rates[i].open / _Point), h = MathRound(rates[i].high / _Point);
      double l = MathRound(rates[i].low / _Point), c = MathRound(rates[i].close / _Point);
      if(MathMax(MathMax(o, h), MathMax(l, c)) >= 16777216.0)
        {
         Print("Natron: prices of 2**24 points or more cannot be held exactly in float32; not trading");
         return false;
        }
      x[i][0] = (float)o;
      x[i][1] = (float)h;
      x[i][2] = (float)l;
      x[i][3] = (float)c;
      x[i][4] = (float)(InpUseRealVolume ? rates[i].real_volume : rates[i].tick_volume);
     }
   vectorf buy(1), sell(1), direction(g_num_direction), regime(g_num_regime);
   if(!OnnxRun(g_onnx, ONNX_DEFAULT, x, buy, sell, direction, regime))
     {
      PrintFormat("Natron: OnnxRun failed: error %d; not trading", GetLastError());
      return false;
     }
   buy_prob = buy[0];
   sell_prob = sell[0];
   if(!OnnxOutputsOk(buy_prob, sell_prob, direction, regime))
     {
      PrintFormat("Natron: ONNX outputs out of range (buy %.6f, sell %.6f); not trading", buy_prob, sell_prob);
      return false;
     }
   return true;
  }

//+------------------------------------------------------------------+
//| HTTP engine                                                      |
//+------------------------------------------------------------------+
string RequestHeaders()
  {
   string headers = "Content-Type: application/json\r\nAccept: application/json\r\n";
   if(InpApiKey != "")
      headers += "X-API-Key: " + InpApiKey + "\r\n";
   return headers;
  }

// Sends one request. Returns the HTTP status, or -1 when no reply came (timeout, connection refused,
// URL not whitelisted); `reply` holds the body.
int HttpRequest(const string method, const string url, const string body, string &reply)
  {
   char data[];
   char result[];
   string result_headers;
   if(body != "")
     {
      int n = StringToCharArray(body, data, 0, WHOLE_ARRAY, CP_UTF8);
      ArrayResize(data, n > 0 ? n - 1 : 0);     // drop the terminating NUL StringToCharArray appends
     }
   ResetLastError();
   int status = WebRequest(method, url, RequestHeaders(), InpTimeoutMs, data, result, result_headers);
   if(status == -1)
     {
      int err = GetLastError();
      if(err == 4014)
         PrintFormat("Natron: WebRequest to %s is not allowed: add the server to Tools > Options > Expert Advisors > "
                     "'Allow WebRequest for listed URL' (e.g. http://127.0.0.1:8000)", url);
      else
         PrintFormat("Natron: no reply from %s within %d ms (error %d)", url, InpTimeoutMs, err);
      reply = "";
      return -1;
     }
   reply = CharArrayToString(result, 0, WHOLE_ARRAY, CP_UTF8);
   return status;
  }

string BaseUrl()
  {
   int pos = StringFind(InpUrl, "/predict");
   return pos > 0 ? StringSubstr(InpUrl, 0, pos) : InpUrl;
  }

// GET /model_info -> required_candles (0 when unavailable).
int FetchRequiredCandles()
  {
   string reply;
   int status = HttpRequest("GET", BaseUrl() + "/model_info", "", reply);
   long required = 0;
   if(status != 200 || !JsonGetLong(reply, "required_candles", required) || required < 1)
     {
      PrintFormat("Natron: GET %s/model_info failed (HTTP %d): %s; retrying every %d s", BaseUrl(), status,
                  StringSubstr(reply, 0, 300), InpRetrySeconds);
      return 0;
     }
   return (int)required;
  }

//+------------------------------------------------------------------+
//| Server time -> UTC. TimeTradeServer() is the trade server's      |
//| clock, TimeGMT() UTC from the computer's clock and time zone;    |
//| their difference, rounded to 15 minutes (every UTC offset is a   |
//| multiple of 15 min), is the server's offset NOW (daylight saving |
//| included); the rounding absorbs a PC clock up to 7 min off.      |
//| Bars older than the server's last DST change get the current     |
//| offset too, one hour off: the model sees no clock, so only their |
//| order (kept) and the last bar's time (exact) matter.             |
//+------------------------------------------------------------------+
long ServerUtcOffset()
  {
   long diff = (long)TimeTradeServer() - (long)TimeGMT();   // as long: a server west of UTC is negative
   return (long)MathRound(diff / 900.0) * 900;
  }

// Request body: {"candles":[{"time":unix_s,"open":..,...},...]} oldest first; time = bar open time in unix
// seconds, UTC (server time minus `offset`, see ServerUtcOffset).
string CandlesJson(const MqlRates &rates[], const int count, const long offset)
  {
   string json = "{\"candles\":[";
   for(int i = 0; i < count; i++)
     {
      long volume = InpUseRealVolume ? rates[i].real_volume : rates[i].tick_volume;
      if(i > 0)
         StringAdd(json, ",");
      StringAdd(json, "{\"time\":" + IntegerToString((long)rates[i].time - offset) +
                ",\"open\":" + DoubleToString(rates[i].open, _Digits) +
                ",\"high\":" + DoubleToString(rates[i].high, _Digits) +
                ",\"low\":" + DoubleToString(rates[i].low, _Digits) +
                ",\"close\":" + DoubleToString(rates[i].close, _Digits) +
                ",\"volume\":" + IntegerToString(volume) + "}");
     }
   StringAdd(json, "]}");
   return json;
  }

bool HttpPredict(const MqlRates &rates[], const int count, const datetime closed_bar, double &buy_prob,
                 double &sell_prob)
  {
   long offset = ServerUtcOffset();                         // one offset per request, used both ways
   string reply;
   int status = HttpRequest("POST", InpUrl, CandlesJson(rates, count, offset), reply);
   if(status == -1)
      return false;                                         // timeout / no connection: no trade on this bar
   if(status != 200)
     {
      PrintFormat("Natron: HTTP %d, not trading: %s", status, StringSubstr(reply, 0, 400));
      return false;
     }
   long stamp = 0;
   string signal = "";
   if(!JsonGetLong(reply, "timestamp", stamp) || !JsonGetString(reply, "signal", signal))
     {
      Print("Natron: unreadable reply, not trading: ", StringSubstr(reply, 0, 400));
      return false;
     }
   if(!ReadProbability(reply, "buy_prob", buy_prob) || !ReadProbability(reply, "sell_prob", sell_prob))
     {
      Print("Natron: probability missing, not a plain decimal or outside [0, 1]; not trading: ", StringSubstr(reply, 0, 400));
      return false;
     }
   if((datetime)(stamp + offset) != closed_bar)              // the reply is UTC: back to server time
     {
      PrintFormat("Natron: stale reply (for %s server time, expected %s; server UTC offset %I64d s); not trading",
                  TimeToString((datetime)(stamp + offset)), TimeToString(closed_bar), offset);
      return false;
     }
   return true;
  }

//+------------------------------------------------------------------+
//| One closed bar: checks, prediction, decision                     |
//+------------------------------------------------------------------+
void OnClosedBar(const datetime forming_bar_open)
  {
   if(g_required <= 0)
     {
      Print("Natron: required_candles not known yet (server unreachable); not trading on this bar");
      return;
     }
   MqlRates rates[];
   ArraySetAsSeries(rates, false);                       // oldest first
   int copied = CopyRates(_Symbol, _Period, 1, g_required, rates);   // from bar 1 = the bar that just closed
   if(copied != g_required)
     {
      PrintFormat("Natron: only %d of %d closed bars available (error %d); not trading", copied, g_required,
                  GetLastError());
      return;
     }
   datetime closed_bar = rates[copied - 1].time;            // server time
   if(!IsFreshBar(closed_bar))
     {
      PrintFormat("Natron: the last closed bar (%s) closed more than one period before now (%s): attach, weekend "
                  "or outage; not trading on it", TimeToString(closed_bar), TimeToString(TimeCurrent()));
      return;
     }
   double buy_prob = 0, sell_prob = 0;
   bool ok = InpEngine == NATRON_ENGINE_ONNX ? OnnxPredict(rates, copied, buy_prob, sell_prob)
                                             : HttpPredict(rates, copied, closed_bar, buy_prob, sell_prob);
   if(!ok)
      return;
   if(iTime(_Symbol, _Period, 0) != forming_bar_open)
     {
      Print("Natron: another bar opened while predicting; not trading on an old prediction");
      return;
     }
   string decision = Decide(buy_prob, sell_prob);
   PrintFormat("Natron: %s bar %s buy=%.4f sell=%.4f -> %s", _Symbol, TimeToString(closed_bar), buy_prob, sell_prob,
               decision);
   Act(decision);
  }

//+------------------------------------------------------------------+
int OnInit()
  {
   if(InpEngine == NATRON_ENGINE_HTTP && MQLInfoInteger(MQL_TESTER))
     {
      Print("Natron: WebRequest does not run in the Strategy Tester; use InpEngine=ONNX there");
      return INIT_FAILED;
     }
   g_trade.SetExpertMagicNumber((ulong)InpMagic);
   g_trade.SetDeviationInPoints(InpDeviationPoints);
   g_trade.SetTypeFillingBySymbol(_Symbol);
   g_atr_handle = iATR(_Symbol, _Period, InpAtrPeriod);
   if(g_atr_handle == INVALID_HANDLE)
     {
      Print("Natron: cannot create the ATR indicator: ", GetLastError());
      return INIT_FAILED;
     }
   if(InpEngine == NATRON_ENGINE_ONNX)
     {
      if(!OnnxInit())
         return INIT_FAILED;
     }
   else
     {
      g_required = InpRequiredCandles > 0 ? InpRequiredCandles : FetchRequiredCandles();
      if(g_required <= 0)
         EventSetTimer(MathMax(InpRetrySeconds, 1));   // a server still starting: keep trying, do not unload
     }
   // Act only on bars that close after the EA started (IsFreshBar also refuses a long-closed one).
   g_bar_open = iTime(_Symbol, _Period, 0);
   PrintFormat("Natron: %s %s, engine %s, %d candles per prediction, threshold %.2f, magic %I64d, %s account, "
               "server time = UTC%+I64d s", _Symbol, EnumToString(_Period), EnumToString(InpEngine), g_required,
               InpThreshold, InpMagic, IsNetting() ? "netting" : "hedging", ServerUtcOffset());
   return INIT_SUCCEEDED;
  }

void OnTimer()
  {
   if(g_required > 0)
     {
      EventKillTimer();
      return;
     }
   g_required = FetchRequiredCandles();
   if(g_required > 0)
     {
      PrintFormat("Natron: server reached: %d candles per prediction", g_required);
      EventKillTimer();
     }
  }

void OnDeinit(const int reason)
  {
   EventKillTimer();
   if(g_atr_handle != INVALID_HANDLE)
      IndicatorRelease(g_atr_handle);
   if(g_onnx != INVALID_HANDLE)
      OnnxRelease(g_onnx);
  }

void OnTick()
  {
   datetime forming = iTime(_Symbol, _Period, 0);
   if(forming == 0 || forming == g_bar_open)
      return;
   // Mark the bar as handled first: a failed prediction is not retried on every tick of the same bar.
   g_bar_open = forming;
   OnClosedBar(forming);
  }
//+------------------------------------------------------------------+
