//+------------------------------------------------------------------+
//| NatronEA.mq5                                                     |
//| Trades the Natron server's predictions, one request per closed   |
//| bar, over HTTP (WebRequest). See mt5/README.md.                  |
//|                                                                  |
//| Time convention: the server speaks UTC only. Bar times in MT5    |
//| are broker SERVER time, so the EA subtracts the server's UTC     |
//| offset before sending and adds it back to the reply's timestamp  |
//| before comparing it with the bar it asked about.                 |
//+------------------------------------------------------------------+
#property copyright   "Natron"
#property version     "1.10"
#property description "On every newly closed bar: POST the last required_candles bars to Natron's /predict,"
#property description "check the reply is for that bar, and open/close this EA's own positions (magic number)."
#property description "Never trades on a timeout, an HTTP error, an unreadable reply or a stale bar time."

#include <Trade\Trade.mqh>

//--- inputs
input string InpUrl              = "http://127.0.0.1:8000/predict"; // Natron /predict URL (whitelist it: Tools > Options > Expert Advisors)
input string InpApiKey           = "";       // API key (sent as X-API-Key); empty when the server has none
input int    InpRequiredCandles  = 0;        // candles per request; 0 = read required_candles from GET /model_info
input int    InpTimeoutMs        = 2000;     // WebRequest timeout (ms); a timeout means no trade on that bar
input double InpThreshold        = 0.6;      // BUY iff buy_prob >= this and buy_prob > sell_prob (SELL mirrored)
input double InpLots             = 0.10;     // position size (lots), rounded to the symbol's volume step
input int    InpAtrPeriod        = 14;       // ATR period for stop and target
input double InpStopAtr          = 1.5;      // stop loss distance in ATRs of the closed bar (0 = no stop)
input double InpTargetAtr        = 3.0;      // take profit distance in ATRs (0 = no target)
input bool   InpCloseOnOpposite  = true;     // close our position when the opposite signal arrives
input bool   InpCloseOnHold      = false;    // close our positions when the signal is HOLD
input long   InpMagic            = 7092024;  // identifies this EA's positions
input int    InpDeviationPoints  = 20;       // max slippage (points)
input bool   InpUseRealVolume    = false;    // send real volume instead of tick volume (use what training used)

//--- state
CTrade   g_trade;
int      g_atr_handle = INVALID_HANDLE;
datetime g_bar_open = 0;      // open time of the bar forming at the last check
int      g_required = 0;      // candles per request

//+------------------------------------------------------------------+
//| Minimal JSON field extraction.                                   |
//| MQL5 has no JSON library. The server's /predict reply is a flat  |
//| object whose scalar fields (buy_prob, sell_prob, signal,         |
//| timestamp, ...) occur once at the top level; nested objects only |
//| hold class names (UP, BULL_WEAK, ...). So "first occurrence of   |
//| the quoted key followed by a colon" finds the right value.       |
//| String values must not contain escaped quotes (ours never do).   |
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

bool JsonGetDouble(const string json, const string key, double &value)
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
   string token = StringSubstr(json, i, j - i);
   if(j == i || token == "null" || StringGetCharacter(token, 0) == '"')
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

//+------------------------------------------------------------------+
//| HTTP                                                             |
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
   if(status != 200 || !JsonGetLong(reply, "required_candles", required))
     {
      PrintFormat("Natron: GET %s/model_info failed (HTTP %d): %s", BaseUrl(), status, StringSubstr(reply, 0, 300));
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
//| In the Strategy Tester TimeGMT() equals the simulated server     |
//| time, so the offset would be 0; the EA does not run there        |
//| (WebRequest is not available in the tester).                     |
//+------------------------------------------------------------------+
long ServerUtcOffset()
  {
   long diff = (long)TimeTradeServer() - (long)TimeGMT();   // as long: a server west of UTC is negative
   return (long)MathRound(diff / 900.0) * 900;
  }

//+------------------------------------------------------------------+
//| Request body: {"candles":[{"time":unix_s,"open":..,...},...]}    |
//| oldest first; time = bar open time in unix seconds, UTC (server  |
//| time minus `offset`, see ServerUtcOffset).                       |
//+------------------------------------------------------------------+
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

//+------------------------------------------------------------------+
//| Decision rule, the server's signal rule with this EA's threshold |
//+------------------------------------------------------------------+
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
      if(!g_trade.PositionClose(ticket, InpDeviationPoints))
         PrintFormat("Natron: closing position %I64u failed: %d %s", ticket, g_trade.ResultRetcode(),
                     g_trade.ResultRetcodeDescription());
     }
  }

double NormalizeLots(const double lots)
  {
   double step = SymbolInfoDouble(_Symbol, SYMBOL_VOLUME_STEP);
   double lo = SymbolInfoDouble(_Symbol, SYMBOL_VOLUME_MIN);
   double hi = SymbolInfoDouble(_Symbol, SYMBOL_VOLUME_MAX);
   double out = step > 0 ? MathFloor(lots / step + 1e-9) * step : lots;
   return MathMin(MathMax(out, lo), hi);
  }

void Open(const bool is_buy, const double atr)
  {
   MqlTick tick;
   if(!SymbolInfoTick(_Symbol, tick))
     {
      Print("Natron: no tick for ", _Symbol, "; not trading");
      return;
     }
   double price = is_buy ? tick.ask : tick.bid;
   // Brokers refuse stops closer than the stops level: widen to it rather than have the order rejected.
   double min_distance = (double)SymbolInfoInteger(_Symbol, SYMBOL_TRADE_STOPS_LEVEL) * _Point;
   double sl = 0.0, tp = 0.0;
   if(InpStopAtr > 0)
     {
      double d = MathMax(InpStopAtr * atr, min_distance);
      sl = NormalizeDouble(is_buy ? price - d : price + d, _Digits);
     }
   if(InpTargetAtr > 0)
     {
      double d = MathMax(InpTargetAtr * atr, min_distance);
      tp = NormalizeDouble(is_buy ? price + d : price - d, _Digits);
     }
   double lots = NormalizeLots(InpLots);
   bool sent = is_buy ? g_trade.Buy(lots, _Symbol, price, sl, tp, "Natron")
                      : g_trade.Sell(lots, _Symbol, price, sl, tp, "Natron");
   uint code = g_trade.ResultRetcode();
   if(!sent || (code != TRADE_RETCODE_DONE && code != TRADE_RETCODE_PLACED))
      PrintFormat("Natron: %s %.2f lots failed: %u %s", is_buy ? "buy" : "sell", lots, code,
                  g_trade.ResultRetcodeDescription());
  }

void Act(const string decision)
  {
   double atr[];
   if(CopyBuffer(g_atr_handle, 0, 1, 1, atr) != 1 || atr[0] <= 0)
     {
      Print("Natron: ATR of the closed bar is not available; not trading");
      return;
     }
   if(decision == "BUY")
     {
      if(InpCloseOnOpposite)
         CloseOwn(POSITION_TYPE_SELL);
      if(CountOwn(POSITION_TYPE_BUY) == 0)
         Open(true, atr[0]);
     }
   else
      if(decision == "SELL")
        {
         if(InpCloseOnOpposite)
            CloseOwn(POSITION_TYPE_BUY);
         if(CountOwn(POSITION_TYPE_SELL) == 0)
            Open(false, atr[0]);
        }
      else
         if(InpCloseOnHold)
           {
            CloseOwn(POSITION_TYPE_BUY);
            CloseOwn(POSITION_TYPE_SELL);
           }
  }

//+------------------------------------------------------------------+
//| One closed bar: request, checks, decision                        |
//+------------------------------------------------------------------+
void OnClosedBar(const datetime forming_bar_open)
  {
   MqlRates rates[];
   ArraySetAsSeries(rates, false);                       // oldest first, as the server expects
   int copied = CopyRates(_Symbol, _Period, 1, g_required, rates);   // from bar 1 = the bar that just closed
   if(copied != g_required)
     {
      PrintFormat("Natron: only %d of %d closed bars available (error %d); not trading", copied, g_required,
                  GetLastError());
      return;
     }
   datetime closed_bar = rates[copied - 1].time;            // server time
   long offset = ServerUtcOffset();                         // one offset per request, used both ways
   string reply;
   int status = HttpRequest("POST", InpUrl, CandlesJson(rates, copied, offset), reply);
   if(status == -1)
      return;                                            // timeout / no connection: no trade on this bar
   if(status != 200)
     {
      PrintFormat("Natron: HTTP %d, not trading: %s", status, StringSubstr(reply, 0, 400));
      return;
     }
   long stamp = 0;
   double buy_prob = 0, sell_prob = 0;
   string signal = "";
   if(!JsonGetLong(reply, "timestamp", stamp) || !JsonGetDouble(reply, "buy_prob", buy_prob) ||
      !JsonGetDouble(reply, "sell_prob", sell_prob) || !JsonGetString(reply, "signal", signal))
     {
      Print("Natron: unreadable reply, not trading: ", StringSubstr(reply, 0, 400));
      return;
     }
   if((datetime)(stamp + offset) != closed_bar)              // the reply is UTC: back to server time
     {
      PrintFormat("Natron: stale reply (for %s server time, expected %s; server UTC offset %I64d s); not trading",
                  TimeToString((datetime)(stamp + offset)), TimeToString(closed_bar), offset);
      return;
     }
   if(iTime(_Symbol, _Period, 0) != forming_bar_open)
     {
      Print("Natron: another bar opened while waiting for the reply; not trading on an old prediction");
      return;
     }
   string decision = Decide(buy_prob, sell_prob);
   PrintFormat("Natron: %s bar %s buy=%.3f sell=%.3f server=%s -> %s", _Symbol, TimeToString(closed_bar), buy_prob,
               sell_prob, signal, decision);
   Act(decision);
  }

//+------------------------------------------------------------------+
int OnInit()
  {
   if(MQLInfoInteger(MQL_TESTER))
     {
      Print("Natron: WebRequest does not work in the Strategy Tester; backtest with natron.backtest instead");
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
   g_required = InpRequiredCandles > 0 ? InpRequiredCandles : FetchRequiredCandles();
   if(g_required <= 0)
     {
      Print("Natron: required_candles unknown (server unreachable?); set InpRequiredCandles or start the server");
      return INIT_FAILED;
     }
   // Act only on bars that close after the EA started, not on the one already closed at attach time.
   g_bar_open = iTime(_Symbol, _Period, 0);
   PrintFormat("Natron: %s %s, %d candles per request to %s, threshold %.2f, magic %I64d, server time = UTC%+I64d s",
               _Symbol, EnumToString(_Period), g_required, InpUrl, InpThreshold, InpMagic, ServerUtcOffset());
   return INIT_SUCCEEDED;
  }

void OnDeinit(const int reason)
  {
   if(g_atr_handle != INVALID_HANDLE)
      IndicatorRelease(g_atr_handle);
  }

void OnTick()
  {
   datetime forming = iTime(_Symbol, _Period, 0);
   if(forming == 0 || forming == g_bar_open)
      return;
   // Mark the bar as handled first: a failed request is not retried on every tick of the same bar.
   g_bar_open = forming;
   OnClosedBar(forming);
  }
//+------------------------------------------------------------------+
